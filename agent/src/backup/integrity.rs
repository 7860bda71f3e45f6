//! What etcd's snapshot stream says about itself: the database, then the
//! database's sha256 as the stream's last 32 bytes (etcd's maintenance
//! server appends it: `server/etcdserver/api/v3rpc/maintenance.go`,
//! "send SHA digest for integrity checks during snapshot restore
//! operation"), which `etcdctl snapshot restore` checks again. Pure: fed
//! the stream in pieces of any size, it hashes everything but the 32 bytes
//! it holds back, so neither the snapshot nor its hash is ever held whole.

use sha2::{Digest, Sha256};

/// The length of the trailing sha256.
pub const HASH_LEN: usize = 32;

/// Hashes a snapshot stream as it passes, holding back its last 32 bytes.
#[derive(Debug, Clone, Default)]
pub struct TrailingHash {
    hasher: Sha256,
    /// The last bytes seen, at most [`HASH_LEN`]: the trailer, if the
    /// stream ends now.
    tail: Vec<u8>,
    total: u64,
}

/// Why a stream does not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Mismatch {
    #[error("{size} bytes is too short to hold a database and its sha256")]
    TooShort { size: u64 },
    #[error("the database's sha256 is {computed}, but the snapshot says {trailer} (the object is damaged, truncated or not an etcd snapshot)")]
    Hash { trailer: String, computed: String },
}

impl TrailingHash {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds the next piece of the stream.
    pub fn update(&mut self, piece: &[u8]) {
        self.total += piece.len() as u64;
        if piece.len() >= HASH_LEN {
            // Everything held back so far, and all of this piece but its
            // end, is database.
            self.hasher.update(&self.tail);
            let (body, tail) = piece.split_at(piece.len() - HASH_LEN);
            self.hasher.update(body);
            self.tail.clear();
            self.tail.extend_from_slice(tail);
        } else {
            self.tail.extend_from_slice(piece);
            if self.tail.len() > HASH_LEN {
                let excess = self.tail.len() - HASH_LEN;
                self.hasher.update(&self.tail[..excess]);
                self.tail.drain(..excess);
            }
        }
    }

    /// Bytes fed so far (the database and its trailer).
    pub fn total(&self) -> u64 {
        self.total
    }

    /// The database's sha256 (lowercase hex), when the stream ended with it.
    pub fn finish(self) -> Result<String, Mismatch> {
        if self.tail.len() < HASH_LEN || self.total <= HASH_LEN as u64 {
            return Err(Mismatch::TooShort { size: self.total });
        }
        let computed = hex(&self.hasher.finalize());
        let trailer = hex(&self.tail);
        if computed == trailer {
            Ok(computed)
        } else {
            Err(Mismatch::Hash { trailer, computed })
        }
    }
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stream as etcd sends it: the database, then its sha256.
    fn snapshot(db: &[u8]) -> Vec<u8> {
        let mut s = db.to_vec();
        s.extend_from_slice(&Sha256::digest(db));
        s
    }

    fn fed_in(stream: &[u8], piece: usize) -> TrailingHash {
        let mut h = TrailingHash::new();
        for p in stream.chunks(piece) {
            h.update(p);
        }
        h
    }

    #[test]
    fn a_snapshot_verifies_whatever_the_pieces_it_arrives_in() {
        let db: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let want = hex(&Sha256::digest(&db));
        let stream = snapshot(&db);
        for piece in [1, 7, 31, 32, 33, 4096, stream.len()] {
            let h = fed_in(&stream, piece);
            assert_eq!(h.total(), stream.len() as u64);
            assert_eq!(h.finish(), Ok(want.clone()), "pieces of {piece}");
        }
    }

    #[test]
    fn a_flipped_byte_anywhere_or_a_cut_stream_is_refused() {
        let db = vec![7u8; 5000];
        let stream = snapshot(&db);
        for at in [0, 2500, 4999, 5000, stream.len() - 1] {
            let mut bad = stream.clone();
            bad[at] ^= 0x01;
            assert!(
                matches!(fed_in(&bad, 100).finish(), Err(Mismatch::Hash { .. })),
                "flipped at {at}"
            );
        }
        for keep in [4096, stream.len() - 1, stream.len() - 32] {
            assert!(
                fed_in(&stream[..keep], 100).finish().is_err(),
                "cut to {keep}"
            );
        }
        assert_eq!(
            fed_in(&stream[..20], 7).finish(),
            Err(Mismatch::TooShort { size: 20 })
        );
        assert_eq!(
            TrailingHash::new().finish(),
            Err(Mismatch::TooShort { size: 0 })
        );
    }
}
