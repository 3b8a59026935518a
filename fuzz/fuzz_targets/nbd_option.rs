//! NBD handshake options: `ClientOption::parse(code, payload)` on what the handshake read.
//!
//! Input: `selector u8 | [code u32 (BE) if selector >= 0xf0] | payload`. Selectors below
//! 0xf0 pick option code `selector % 16` (every option the server knows and some it does
//! not); the payload is capped at `MAX_OPTION_LEN` like the handshake does.

#![no_main]

use hlstore_nbd::option::{ClientOption, MAX_OPTION_LEN};
use hlstore_nbd::proto::*;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else { return };
    let (code, payload) = if selector < 0xf0 {
        (u32::from(selector % 16), rest)
    } else {
        let Some((code, payload)) = rest.split_first_chunk::<4>() else { return };
        (u32::from_be_bytes(*code), payload)
    };
    let payload = &payload[..payload.len().min(MAX_OPTION_LEN as usize)];

    let Ok(option) = ClientOption::parse(code, payload) else { return };
    let check_name = |name: &str| {
        assert!(name.len() <= MAX_STRING_LEN);
        assert!(!name.contains('\0'));
    };
    match option {
        ClientOption::ExportName(name) => {
            assert_eq!(code, OPT_EXPORT_NAME);
            check_name(&name);
            assert_eq!(name.as_bytes(), payload);
        }
        ClientOption::Abort => assert_eq!(code, OPT_ABORT),
        ClientOption::List => assert!(code == OPT_LIST && payload.is_empty()),
        ClientOption::Info { go, name, requests } => {
            assert_eq!(code, if go { OPT_GO } else { OPT_INFO });
            check_name(&name);
            assert_eq!(payload.len(), 4 + name.len() + 2 + 2 * requests.len(), "the whole payload is used");
        }
        ClientOption::Unsupported(c) => {
            assert_eq!(c, code);
            assert!(![OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_INFO, OPT_GO].contains(&code));
        }
    }
});
