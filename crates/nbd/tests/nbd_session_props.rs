//! Property test of whole sessions against a byte model: random sequences of requests
//! (valid and invalid: unaligned, out of range, unknown commands and flags) go through the
//! real handshake and transmission code over an in-memory stream, and every reply and every
//! byte read must match what a plain `Vec<u8>` model says.

use std::sync::Arc;

use hlstore_nbd::proto::*;
use hlstore_nbd::request::RequestHeader;
use hlstore_nbd::{ExportRegistry, MemDevice, NbdStats, Negotiating};
use proptest::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio_util::sync::CancellationToken;

const SIZE: u64 = 64 * 1024;
const BS: u64 = 4096;

#[derive(Debug, Clone)]
struct Req {
    command: u16,
    flags: u16,
    offset: u64,
    length: u32,
    fill: u8,
}

fn req() -> impl Strategy<Value = Req> {
    let command = prop_oneof![
        4 => Just(CMD_READ),
        4 => Just(CMD_WRITE),
        2 => Just(CMD_TRIM),
        2 => Just(CMD_WRITE_ZEROES),
        1 => Just(CMD_FLUSH),
        1 => Just(CMD_CACHE),
        1 => 8u16..20,
    ];
    let flags = prop_oneof![
        4 => Just(0u16),
        2 => Just(CMD_FLAG_FUA),
        2 => Just(CMD_FLAG_NO_HOLE),
        1 => any::<u16>(),
    ];
    let offset = prop_oneof![8 => 0..SIZE + 100, 1 => Just(SIZE), 1 => any::<u64>()];
    (command, flags, offset, 0u32..20_000, any::<u8>()).prop_map(|(command, flags, offset, length, fill)| Req {
        command,
        flags,
        offset,
        length,
        fill,
    })
}

/// The reply the model expects and the model update: (errno, data of a successful read).
fn model_apply(model: &mut [u8], r: &Req) -> (u32, Vec<u8>) {
    let allowed = if r.command == CMD_WRITE_ZEROES { CMD_FLAG_FUA | CMD_FLAG_NO_HOLE } else { CMD_FLAG_FUA };
    let known = matches!(r.command, CMD_READ | CMD_WRITE | CMD_FLUSH | CMD_TRIM | CMD_WRITE_ZEROES);
    if !known || r.flags & !allowed != 0 {
        return (EINVAL, vec![]);
    }
    let end = r.offset.checked_add(u64::from(r.length));
    let in_range = end.is_some_and(|e| e <= SIZE);
    let (o, e) = (r.offset as usize, end.unwrap_or(0) as usize);
    match r.command {
        CMD_FLUSH => (0, vec![]),
        CMD_READ if !in_range => (EINVAL, vec![]),
        CMD_READ => (0, model[o..e].to_vec()),
        CMD_WRITE if !in_range => (ENOSPC, vec![]),
        CMD_WRITE => {
            model[o..e].fill(r.fill);
            (0, vec![])
        }
        CMD_WRITE_ZEROES if !in_range => (ENOSPC, vec![]),
        CMD_WRITE_ZEROES => {
            model[o..e].fill(0);
            (0, vec![])
        }
        CMD_TRIM if !in_range => (EINVAL, vec![]),
        CMD_TRIM => {
            // The server discards only whole blocks inside the range.
            let s = r.offset.div_ceil(BS) * BS;
            let t = end.unwrap_or(0) / BS * BS;
            if s < t {
                model[s as usize..t as usize].fill(0);
            }
            (0, vec![])
        }
        _ => unreachable!(),
    }
}

async fn run_session(reqs: Vec<Req>) -> Result<(), TestCaseError> {
    let dev = Arc::new(MemDevice::new("m", SIZE).unwrap());
    let registry = ExportRegistry::new();
    registry.insert("m", dev.clone());
    let (mut client, server): (DuplexStream, DuplexStream) = tokio::io::duplex(1 << 20);
    let serving = tokio::spawn(async move {
        let t = Negotiating::start(server).await.map_err(|e| e.to_string())?;
        let t = t.negotiate(&registry, || false).await.map_err(|e| e.to_string())?;
        let t = t.ok_or("aborted")?;
        t.serve(Arc::new(NbdStats::default()), CancellationToken::new()).await.map_err(|e| e.to_string())
    });

    let mut greeting = [0u8; 18];
    client.read_exact(&mut greeting).await.unwrap();
    client.write_u32(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).await.unwrap();
    client.write_u64(IHAVEOPT).await.unwrap();
    client.write_u32(OPT_EXPORT_NAME).await.unwrap();
    client.write_u32(1).await.unwrap();
    client.write_all(b"m").await.unwrap();
    let mut export = [0u8; 10];
    client.read_exact(&mut export).await.unwrap();
    prop_assert_eq!(u64::from_be_bytes(export[..8].try_into().unwrap()), SIZE);

    let mut model = vec![0u8; SIZE as usize];
    for (i, r) in reqs.iter().enumerate() {
        let header =
            RequestHeader { flags: r.flags, command: r.command, cookie: i as u64, offset: r.offset, length: r.length };
        client.write_all(&header.encode()).await.unwrap();
        if r.command == CMD_WRITE {
            client.write_all(&vec![r.fill; r.length as usize]).await.unwrap();
        }
        let (want_errno, want_data) = model_apply(&mut model, r);
        prop_assert_eq!(client.read_u32().await.unwrap(), SIMPLE_REPLY_MAGIC);
        let errno = client.read_u32().await.unwrap();
        prop_assert_eq!(client.read_u64().await.unwrap(), i as u64);
        prop_assert_eq!(errno, want_errno, "request {} {:?}", i, r);
        if r.command == CMD_READ && errno == 0 {
            let mut data = vec![0u8; r.length as usize];
            client.read_exact(&mut data).await.unwrap();
            prop_assert!(data == want_data, "read {} {:?} differs from the model", i, r);
        }
    }
    prop_assert!(dev.read_bytes(0, SIZE as usize) == model, "device differs from the model");
    client
        .write_all(&RequestHeader { flags: 0, command: CMD_DISC, cookie: 0, offset: 0, length: 0 }.encode())
        .await
        .unwrap();
    let served = serving.await.unwrap();
    prop_assert!(served.is_ok(), "{:?}", served);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn sessions_match_a_byte_model(reqs in prop::collection::vec(req(), 1..40)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(run_session(reqs))?;
    }
}
