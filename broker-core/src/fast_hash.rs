//! A cheap hasher for maps whose keys this library or the application
//! picks, looked up once or more per message, where SipHash's cost shows.

use std::hash::Hasher;

/// FxHash's mix (a rotate, xor and multiply per word). Not for keys an
/// attacker picks to collide in an unbounded map: SipHash resists that,
/// this does not.
#[derive(Default, Clone, Copy)]
pub(crate) struct FastHash(u64);

impl FastHash {
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
}

impl Hasher for FastHash {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        let mut words = bytes.chunks_exact(8);
        for word in words.by_ref() {
            self.add(u64::from_le_bytes(word.try_into().expect("8 bytes")));
        }
        for &byte in words.remainder() {
            self.add(u64::from(byte));
        }
    }
    fn write_u8(&mut self, n: u8) {
        self.add(u64::from(n));
    }
    fn write_u64(&mut self, n: u64) {
        self.add(n);
    }
}

/// A `HashMap` with [`FastHash`].
pub(crate) type FastMap<K, V> =
    std::collections::HashMap<K, V, std::hash::BuildHasherDefault<FastHash>>;
