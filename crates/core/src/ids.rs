//! Newtypes for the numbers the data path passes around in rows: epochs, write sequence
//! numbers and byte offsets into a volume. `ReplicaStore::write(volume, epoch, seq, offset,
//! ..)` with four bare `u64`s let a swapped pair compile; with these it cannot.
//!
//! Each is a transparent `u64` (`.get()` reads it, `From<u64>` makes one) and orders like
//! one. Wire formats and on-disk keys keep plain integers: conversion happens at the edge
//! (protobuf conversion, key encoding).

use std::fmt;

macro_rules! newtype_u64 {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
        #[repr(transparent)]
        pub struct $name(pub u64);

        impl $name {
            pub const ZERO: $name = $name(0);

            /// The plain number (for wire formats, keys, arithmetic).
            #[inline]
            pub const fn get(self) -> u64 {
                self.0
            }
        }

        impl From<u64> for $name {
            #[inline]
            fn from(v: u64) -> Self {
                $name(v)
            }
        }

        impl From<$name> for u64 {
            #[inline]
            fn from(v: $name) -> u64 {
                v.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }
    };
}

newtype_u64!(
    /// An engine activation number. A replica refuses requests of an older epoch
    /// (`StaleEpoch`); each attach bumps it.
    Epoch
);

newtype_u64!(
    /// A write sequence number: every write and trim of a volume gets the next one, with the
    /// epoch that issued it in its high bits (see the replication contract).
    Seq
);

newtype_u64!(
    /// A byte offset into a volume. On the store and replication APIs it is a multiple of
    /// the block size.
    Offset
);

impl Seq {
    /// The seq after this one.
    #[inline]
    pub const fn next(self) -> Seq {
        Seq(self.0 + 1)
    }
}

impl Offset {
    /// This offset moved forward by `len` bytes (`None` on overflow).
    #[inline]
    pub fn checked_add(self, len: u64) -> Option<Offset> {
        self.0.checked_add(len).map(Offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn they_order_and_print_like_their_numbers() {
        assert!(Seq(3) < Seq(4));
        assert_eq!(Seq(3).next(), Seq(4));
        assert_eq!(Epoch::from(7).get(), 7);
        assert_eq!(Offset(4096).to_string(), "4096");
        assert_eq!(Offset(u64::MAX).checked_add(1), None);
        assert_eq!(u64::from(Offset(8192)), 8192);
    }
}
