//! Fuzz-style property tests of the NBD request and option parsers: arbitrary bytes never
//! panic, garbage is rejected, and whatever is accepted is safe to serve.

use hlstore_nbd::option::{ClientOption, MAX_OPTION_LEN};
use hlstore_nbd::proto::*;
use hlstore_nbd::request::{plan, plan_for_export, Op, Plan, RequestHeader, MAX_DRAIN, MAX_PAYLOAD};
use proptest::prelude::*;

fn header_bytes() -> impl Strategy<Value = [u8; REQUEST_HEADER_LEN]> {
    prop::array::uniform28(any::<u8>())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4096, ..ProptestConfig::default() })]

    #[test]
    fn request_parser_never_panics_and_checks_magic(bytes in header_bytes(), size in any::<u64>()) {
        match RequestHeader::parse(&bytes) {
            Ok(h) => {
                prop_assert_eq!(&bytes[..4], &REQUEST_MAGIC.to_be_bytes()[..]);
                prop_assert_eq!(h.encode(), bytes);
                let _ = plan(&h, size);
            }
            Err(bad) => prop_assert_ne!(bad.0, REQUEST_MAGIC),
        }
    }

    #[test]
    fn planned_requests_are_safe_to_serve(
        flags in any::<u16>(),
        command in prop_oneof![0u16..10, any::<u16>()],
        offset in prop_oneof![0u64..(1 << 30), any::<u64>()],
        length in prop_oneof![0u32..(1 << 20), any::<u32>()],
        size in prop_oneof![Just(64u64 << 20), any::<u64>()],
    ) {
        let h = RequestHeader { flags, command, cookie: 1, offset, length };
        match plan(&h, size) {
            Plan::Serve(op) => {
                prop_assert!(flags & !(CMD_FLAG_FUA | CMD_FLAG_NO_HOLE) == 0);
                let range = match op {
                    Op::Read { offset, length } | Op::Write { offset, length, .. } => {
                        prop_assert!(length <= MAX_PAYLOAD);
                        Some((offset, length))
                    }
                    Op::Trim { offset, length, .. } | Op::WriteZeroes { offset, length, .. } => Some((offset, length)),
                    Op::Flush | Op::Disconnect => None,
                };
                if let Some((o, l)) = range {
                    prop_assert!(o.checked_add(u64::from(l)).is_some_and(|end| end <= size));
                }
            }
            Plan::Reject { errno, drain } => {
                prop_assert!([EINVAL, ENOSPC, EOVERFLOW].contains(&errno));
                prop_assert!(drain <= MAX_DRAIN);
                prop_assert!(drain == 0 || command == CMD_WRITE);
            }
            Plan::Close(_) => prop_assert!(command == CMD_WRITE && length > MAX_DRAIN),
        }
    }

    #[test]
    fn read_only_exports_never_serve_mutations(
        flags in any::<u16>(), command in 0u16..10, offset in 0u64..(1 << 22), length in 0u32..(1 << 22),
    ) {
        let h = RequestHeader { flags, command, cookie: 1, offset, length };
        match plan_for_export(&h, 1 << 22, true) {
            Plan::Serve(op) => prop_assert!(matches!(op, Op::Read { .. } | Op::Flush | Op::Disconnect), "{:?}", op),
            Plan::Reject { errno, drain } => {
                prop_assert!([EINVAL, ENOSPC, EOVERFLOW, EPERM].contains(&errno));
                prop_assert!(drain == 0 || command == CMD_WRITE);
            }
            Plan::Close(_) => prop_assert!(command == CMD_WRITE),
        }
        prop_assert_eq!(plan_for_export(&h, 1 << 22, false), plan(&h, 1 << 22));
    }

    #[test]
    fn option_parser_never_panics(code in prop_oneof![0u32..12, any::<u32>()], data in prop::collection::vec(any::<u8>(), 0..600)) {
        let _ = ClientOption::parse(code, &data);
    }

    #[test]
    fn go_payloads_round_trip(name in "[a-zA-Z0-9/_-]{0,64}", infos in prop::collection::vec(any::<u16>(), 0..20), go in any::<bool>()) {
        let mut p = (name.len() as u32).to_be_bytes().to_vec();
        p.extend_from_slice(name.as_bytes());
        p.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in &infos {
            p.extend_from_slice(&i.to_be_bytes());
        }
        prop_assert!(p.len() as u32 <= MAX_OPTION_LEN);
        let code = if go { OPT_GO } else { OPT_INFO };
        prop_assert_eq!(ClientOption::parse(code, &p), Ok(ClientOption::Info { go, name: name.clone(), requests: infos.clone() }));
        // Any truncation or extension by one byte breaks the length fields: rejected.
        prop_assert!(ClientOption::parse(code, &p[..p.len() - 1]).is_err());
        let mut longer = p.clone();
        longer.push(0);
        prop_assert!(ClientOption::parse(code, &longer).is_err());
    }
}
