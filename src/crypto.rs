//! The pre-shared key: proving it in the handshake, and sealing frames.
//!
//! Authentication is a mutual challenge-response over HMAC-SHA256: tx sends
//! a fresh nonce in its hello, rx answers with its own nonce and a MAC over
//! the hello and that nonce (proving it holds the key), and tx answers with a
//! MAC over the whole transcript (proving it holds the key, for this rx
//! nonce only, so a recorded handshake cannot be replayed). The key itself
//! never crosses the wire.
//!
//! Encryption derives two AES-256-GCM keys per connection (one per
//! direction) with HKDF-SHA256 from the key and both nonces. Each frame is
//! sealed under a counter nonce with its 16-byte header as associated data,
//! so a frame cannot be altered, reordered, replayed or moved to another
//! connection without failing to open. Counters start at zero on every
//! connection and keys are never reused across connections.
//!
//! Cryptography comes from `ring`; nothing here does I/O.

use crate::error::Error;
use ring::rand::{SecureRandom, SystemRandom};
use ring::{aead, hkdf, hmac};
use std::path::Path;

/// Length of each side's handshake nonce.
pub const NONCE_LEN: usize = 32;
/// Length of a handshake proof (HMAC-SHA256).
pub const PROOF_LEN: usize = 32;
/// Length of the authentication tag on every sealed frame.
pub const TAG_LEN: usize = 16;
/// Shortest key accepted, in bytes.
pub const MIN_KEY_LEN: usize = 16;

const RX_PROOF: &[u8] = b"viamillipede v1 rx proof";
const TX_PROOF: &[u8] = b"viamillipede v1 tx proof";
const TX_TO_RX: &[u8] = b"viamillipede v1 tx->rx";
const RX_TO_TX: &[u8] = b"viamillipede v1 rx->tx";

/// A pre-shared secret.
#[derive(Clone)]
pub struct Key {
    secret: Vec<u8>,
    mac: hmac::Key,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(..)")
    }
}

impl PartialEq for Key {
    fn eq(&self, other: &Key) -> bool {
        self.secret == other.secret
    }
}

impl Eq for Key {}

impl Key {
    /// A key from its bytes (at least [`MIN_KEY_LEN`]).
    pub fn new(secret: &[u8]) -> Result<Key, String> {
        if secret.len() < MIN_KEY_LEN {
            return Err(format!(
                "a key must be at least {MIN_KEY_LEN} bytes, this one has {}",
                secret.len()
            ));
        }
        Ok(Key {
            secret: secret.to_vec(),
            mac: hmac::Key::new(hmac::HMAC_SHA256, secret),
        })
    }

    /// Reads a key file: its bytes, without a final line ending (so a hex
    /// key written by `echo` works; a binary key is taken whole). Returns the key and a warning if
    /// the file can be read by other users.
    pub fn load(path: &Path) -> Result<(Key, Option<String>), Error> {
        let shown = path.display();
        let bytes =
            std::fs::read(path).map_err(|e| Error::Usage(format!("read key file {shown}: {e}")))?;
        // Only a final line ending goes: a binary key may end in any byte.
        let key_bytes = bytes
            .strip_suffix(b"\r\n")
            .or_else(|| bytes.strip_suffix(b"\n"))
            .unwrap_or(&bytes);
        let key =
            Key::new(key_bytes).map_err(|e| Error::Usage(format!("key file {shown}: {e}")))?;
        Ok((key, loose_permissions(path)))
    }

    /// rx's proof: a MAC over tx's hello and rx's nonce.
    pub fn rx_proof(&self, hello: &[u8], rx_nonce: &[u8]) -> [u8; PROOF_LEN] {
        self.proof(&[RX_PROOF, hello, rx_nonce])
    }

    /// tx's proof: a MAC over the hello and rx's challenge.
    pub fn tx_proof(&self, hello: &[u8], challenge: &[u8]) -> [u8; PROOF_LEN] {
        self.proof(&[TX_PROOF, hello, challenge])
    }

    fn proof(&self, parts: &[&[u8]]) -> [u8; PROOF_LEN] {
        let mut ctx = hmac::Context::with_key(&self.mac);
        for p in parts {
            // Length-prefixed, so moving bytes between parts changes the MAC.
            ctx.update(&(p.len() as u32).to_be_bytes());
            ctx.update(p);
        }
        ctx.sign()
            .as_ref()
            .try_into()
            .expect("HMAC-SHA256 is 32 bytes")
    }

    /// The sealing and opening keys of one connection, for the side that
    /// sends in direction `tx_to_rx` (tx: true, rx: false).
    pub fn channel(&self, tx_nonce: &[u8], rx_nonce: &[u8], tx_side: bool) -> (Sealer, Opener) {
        let salt: Vec<u8> = [tx_nonce, rx_nonce].concat();
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, &salt).extract(&self.secret);
        let derive = |info: &[u8]| {
            let info = [info];
            let okm = prk
                .expand(&info, &aead::AES_256_GCM)
                .expect("HKDF output of one AES key length");
            aead::LessSafeKey::new(aead::UnboundKey::from(okm))
        };
        let (send, recv) = if tx_side {
            (TX_TO_RX, RX_TO_TX)
        } else {
            (RX_TO_TX, TX_TO_RX)
        };
        (
            Sealer {
                key: derive(send),
                counter: 0,
            },
            Opener {
                key: derive(recv),
                counter: 0,
            },
        )
    }
}

/// Whether a proof matches, in constant time.
pub fn proofs_match(a: &[u8; PROOF_LEN], b: &[u8]) -> bool {
    b.len() == PROOF_LEN && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A fresh random nonce for a handshake.
pub fn nonce() -> Result<[u8; NONCE_LEN], Error> {
    let mut n = [0u8; NONCE_LEN];
    SystemRandom::new()
        .fill(&mut n)
        .map_err(|_| Error::Internal("the system has no source of randomness".into()))?;
    Ok(n)
}

#[cfg(unix)]
fn loose_permissions(path: &Path) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).ok()?.permissions().mode();
    (mode & 0o077 != 0).then(|| {
        format!(
            "key file {} can be read by other users (mode {:o}); chmod 600 it",
            path.display(),
            mode & 0o777
        )
    })
}

#[cfg(not(unix))]
fn loose_permissions(_: &Path) -> Option<String> {
    None
}

fn frame_nonce(counter: &mut u64) -> aead::Nonce {
    let mut n = [0u8; aead::NONCE_LEN];
    n[4..].copy_from_slice(&counter.to_be_bytes());
    // 2^64 frames per connection is out of reach; never wrap a nonce anyway.
    *counter = counter.checked_add(1).expect("frame counter exhausted");
    aead::Nonce::assume_unique_for_key(n)
}

/// Seals the frames one side sends on one connection.
pub struct Sealer {
    key: aead::LessSafeKey,
    counter: u64,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Sealer({})", self.counter)
    }
}

impl Sealer {
    /// Encrypts `data` in place, authenticating `aad` too; returns the tag.
    pub fn seal(&mut self, aad: &[u8], data: &mut [u8]) -> [u8; TAG_LEN] {
        let nonce = frame_nonce(&mut self.counter);
        let tag = self
            .key
            .seal_in_place_separate_tag(nonce, aead::Aad::from(aad), data)
            .expect("AES-GCM seals any frame length used here");
        tag.as_ref().try_into().expect("16-byte tag")
    }
}

/// Opens the frames one side receives on one connection.
pub struct Opener {
    key: aead::LessSafeKey,
    counter: u64,
}

impl std::fmt::Debug for Opener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Opener({})", self.counter)
    }
}

/// A frame failed to open: altered, replayed, reordered or forged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpenError;

impl std::fmt::Display for OpenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("frame failed authentication (altered, replayed or forged)")
    }
}

impl std::error::Error for OpenError {}

impl Opener {
    /// Decrypts `data` in place if it and `aad` match `tag`.
    pub fn open(
        &mut self,
        aad: &[u8],
        data: &mut [u8],
        tag: &[u8; TAG_LEN],
    ) -> Result<(), OpenError> {
        let nonce = frame_nonce(&mut self.counter);
        self.key
            .open_in_place_separate_tag(
                nonce,
                aead::Aad::from(aad),
                aead::Tag::from(*tag),
                data,
                0..,
            )
            .map(drop)
            .map_err(|_| OpenError)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> Key {
        Key::new(&[b; 32]).unwrap()
    }

    #[test]
    fn short_keys_are_refused() {
        assert!(Key::new(b"short").unwrap_err().contains("at least 16"));
    }

    #[test]
    fn proofs_depend_on_key_and_transcript() {
        let (a, b) = (key(1), key(2));
        let p = a.rx_proof(b"hello", b"nonce");
        assert!(proofs_match(&p, &a.rx_proof(b"hello", b"nonce")));
        assert!(!proofs_match(&p, &b.rx_proof(b"hello", b"nonce")));
        assert!(!proofs_match(&p, &a.rx_proof(b"hello", b"nonc3")));
        assert!(!proofs_match(&p, &a.rx_proof(b"hell", b"onnonce")));
        assert!(!proofs_match(&p, &a.tx_proof(b"hello", b"nonce")));
        assert!(!proofs_match(&p, &p[..31]));
    }

    #[test]
    fn frames_open_only_in_order_with_their_header() {
        let k = key(3);
        let (mut tx_seal, mut tx_open) = k.channel(b"t", b"r", true);
        let (mut rx_seal, mut rx_open) = k.channel(b"t", b"r", false);
        let mut a = b"first foot".to_vec();
        let tag_a = tx_seal.seal(b"header-a", &mut a);
        assert_ne!(&a[..], b"first foot");
        let mut b = b"second".to_vec();
        let tag_b = tx_seal.seal(b"header-b", &mut b);
        // Out of order: fails.
        let mut b2 = b.clone();
        assert_eq!(rx_open.open(b"header-b", &mut b2, &tag_b), Err(OpenError));

        let (_, mut rx_open) = k.channel(b"t", b"r", false);
        let mut a2 = a.clone();
        assert_eq!(rx_open.open(b"header-x", &mut a2, &tag_a), Err(OpenError));
        let (_, mut rx_open) = k.channel(b"t", b"r", false);
        rx_open.open(b"header-a", &mut a, &tag_a).unwrap();
        assert_eq!(&a[..], b"first foot");
        rx_open.open(b"header-b", &mut b, &tag_b).unwrap();
        assert_eq!(&b[..], b"second");

        // The other direction uses another key.
        let mut ack = Vec::new();
        let tag = rx_seal.seal(b"ack", &mut ack);
        tx_open.open(b"ack", &mut ack, &tag).unwrap();
        let (mut other_seal, _) = k.channel(b"t", b"R", false);
        let tag = other_seal.seal(b"ack", &mut ack);
        assert_eq!(tx_open.open(b"ack", &mut ack, &tag), Err(OpenError));
    }

    #[test]
    fn key_files_lose_trailing_newlines_and_warn_when_readable() {
        let dir = std::env::temp_dir().join(format!("vm-key-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("key");
        std::fs::write(&path, b"0123456789abcdef0123\n").unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
            let (k, warning) = Key::load(&path).unwrap();
            assert_eq!(k, Key::new(b"0123456789abcdef0123").unwrap());
            assert!(warning.unwrap().contains("chmod 600"));
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
            assert!(Key::load(&path).unwrap().1.is_none());
        }
        // A binary key is taken whole, whatever bytes it ends with.
        std::fs::write(&path, [b'\t'; 20]).unwrap();
        assert_eq!(Key::load(&path).unwrap().0, Key::new(&[b'\t'; 20]).unwrap());
        std::fs::write(&path, b"short\n").unwrap();
        assert!(matches!(Key::load(&path), Err(Error::Usage(_))));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
