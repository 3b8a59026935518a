//! Handshake options: parsing an option's payload into a [`ClientOption`].
//!
//! Pure (no IO), so it can be fuzzed. The handshake reads the option header and at most
//! [`MAX_OPTION_LEN`] bytes of payload, then asks [`ClientOption::parse`] what was asked for.

use super::proto::*;

/// Longest option payload the server reads; a longer one is discarded and answered with
/// `NBD_REP_ERR_TOO_BIG`. (The largest sensible one, `NBD_OPT_GO`, is a 4096-byte name plus
/// a handful of info requests.)
pub const MAX_OPTION_LEN: u32 = 64 * 1024;

/// A parsed client option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientOption {
    /// `NBD_OPT_EXPORT_NAME`: enter transmission with this export (no error reply possible).
    ExportName(String),
    /// `NBD_OPT_ABORT`.
    Abort,
    /// `NBD_OPT_LIST`.
    List,
    /// `NBD_OPT_INFO` (`go == false`) or `NBD_OPT_GO` (`go == true`).
    Info { go: bool, name: String, requests: Vec<u16> },
    /// An option this server does not implement (answered with `NBD_REP_ERR_UNSUP`).
    Unsupported(u32),
}

/// Why an option was refused; maps to an option reply error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OptionError {
    /// Syntactically invalid payload (`NBD_REP_ERR_INVALID`), with a message for the client.
    Invalid(&'static str),
}

impl ClientOption {
    /// Parses the payload `data` of option `code`.
    pub fn parse(code: u32, data: &[u8]) -> Result<ClientOption, OptionError> {
        match code {
            OPT_EXPORT_NAME => {
                let name = parse_name(data)?;
                Ok(ClientOption::ExportName(name))
            }
            OPT_ABORT => Ok(ClientOption::Abort),
            OPT_LIST if data.is_empty() => Ok(ClientOption::List),
            OPT_LIST => Err(OptionError::Invalid("NBD_OPT_LIST carries no data")),
            OPT_INFO | OPT_GO => parse_info(code == OPT_GO, data),
            other => Ok(ClientOption::Unsupported(other)),
        }
    }
}

fn parse_name(bytes: &[u8]) -> Result<String, OptionError> {
    if bytes.len() > MAX_STRING_LEN {
        return Err(OptionError::Invalid("export name longer than 4096 bytes"));
    }
    let name = std::str::from_utf8(bytes).map_err(|_| OptionError::Invalid("export name is not UTF-8"))?;
    if name.contains('\0') {
        return Err(OptionError::Invalid("export name contains NUL"));
    }
    Ok(name.to_owned())
}

/// `NBD_OPT_INFO`/`NBD_OPT_GO` payload: u32 name length, name, u16 count, count × u16.
fn parse_info(go: bool, data: &[u8]) -> Result<ClientOption, OptionError> {
    const TRUNCATED: OptionError = OptionError::Invalid("truncated NBD_OPT_INFO/NBD_OPT_GO payload");
    let (len_bytes, rest) = data.split_first_chunk::<4>().ok_or(TRUNCATED)?;
    let name_len = usize::try_from(u32::from_be_bytes(*len_bytes)).map_err(|_| TRUNCATED)?;
    if name_len > rest.len() {
        return Err(TRUNCATED);
    }
    let (name, rest) = rest.split_at(name_len);
    let name = parse_name(name)?;
    let (count, rest) = rest.split_first_chunk::<2>().ok_or(TRUNCATED)?;
    let count = usize::from(u16::from_be_bytes(*count));
    if rest.len() != count * 2 {
        return Err(OptionError::Invalid("NBD_OPT_INFO/NBD_OPT_GO request count does not match its length"));
    }
    let requests = rest.chunks_exact(2).map(|c| u16::from_be_bytes([c[0], c[1]])).collect();
    Ok(ClientOption::Info { go, name, requests })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn go_payload(name: &str, requests: &[u16]) -> Vec<u8> {
        let mut out = (name.len() as u32).to_be_bytes().to_vec();
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(&(requests.len() as u16).to_be_bytes());
        for r in requests {
            out.extend_from_slice(&r.to_be_bytes());
        }
        out
    }

    #[test]
    fn parses_go_and_info() {
        let p = go_payload("vol1", &[INFO_BLOCK_SIZE, INFO_NAME]);
        assert_eq!(
            ClientOption::parse(OPT_GO, &p),
            Ok(ClientOption::Info { go: true, name: "vol1".into(), requests: vec![INFO_BLOCK_SIZE, INFO_NAME] })
        );
        assert_eq!(
            ClientOption::parse(OPT_INFO, &go_payload("", &[])),
            Ok(ClientOption::Info { go: false, name: String::new(), requests: vec![] })
        );
    }

    #[test]
    fn rejects_malformed_payloads() {
        let mut p = go_payload("vol1", &[INFO_BLOCK_SIZE]);
        p.pop();
        assert!(ClientOption::parse(OPT_GO, &p).is_err());
        assert!(ClientOption::parse(OPT_GO, &[0, 0, 0, 9, b'a']).is_err());
        assert!(ClientOption::parse(OPT_GO, &[0, 0]).is_err());
        assert!(ClientOption::parse(OPT_LIST, &[1]).is_err());
        assert!(ClientOption::parse(OPT_EXPORT_NAME, &[0xff, 0xfe]).is_err());
        assert!(ClientOption::parse(OPT_EXPORT_NAME, b"a\0b").is_err());
    }

    #[test]
    fn unknown_options_are_unsupported() {
        assert_eq!(ClientOption::parse(OPT_STRUCTURED_REPLY, &[]), Ok(ClientOption::Unsupported(OPT_STRUCTURED_REPLY)));
        assert_eq!(ClientOption::parse(0xdead, &[1, 2]), Ok(ClientOption::Unsupported(0xdead)));
        assert_eq!(ClientOption::parse(OPT_EXPORT_NAME, b"x"), Ok(ClientOption::ExportName("x".into())));
    }
}
