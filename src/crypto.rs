//! The pre-shared key: checking that a key file holds a real key, proving
//! it in the handshake, and protecting every frame of a keyed connection.
//!
//! **Keys.** A key must be at least 32 random bytes (or 64 hex digits, or
//! 43 base64 characters): the handshake answers any hello with a MAC under
//! the key, so a human passphrase could be guessed offline from one
//! recorded exchange. A file that looks like a phrase, is short, or repeats
//! a few symbols is refused, with `viamillipede --genkey FILE` as the way
//! to make a good one.
//!
//! **Proofs** are HMAC-SHA256 over length-prefixed parts under a label per
//! use (`protocol::negotiate` says which); nothing here does I/O.
//!
//! **Frames.** Once both sides have proved the key, each direction of a
//! connection gets keys of its own, derived with HKDF-SHA256 from the key
//! and both handshake nonces. Every frame then carries a 16-byte tag under
//! a counter that starts at zero on each connection, so a frame cannot be
//! altered, forged, replayed, reordered or moved to another connection:
//! - *sealed* (`--encrypt`): AES-256-GCM, the frame header as associated
//!   data;
//! - *authenticated* (a key without `--encrypt`): HMAC-SHA256 over the
//!   counter, the header and the payload, truncated to 16 bytes, with the
//!   payload in the clear. (ring's AEAD takes its associated data as one
//!   slice, so authenticating a foot in the clear with it would copy every
//!   foot; the HMAC streams over header and payload where they lie.)
//!
//! Cryptography comes from `ring`.

use crate::error::Error;
use ring::rand::{SecureRandom, SystemRandom};
use ring::{aead, hkdf, hmac};
use std::path::Path;

/// Length of each side's handshake nonce.
pub const NONCE_LEN: usize = 32;
/// Length of a handshake proof (HMAC-SHA256).
pub const PROOF_LEN: usize = 32;
/// Length of the tag on every protected frame.
pub const TAG_LEN: usize = 16;
/// Shortest key accepted, in bytes.
pub const MIN_KEY_LEN: usize = 32;
/// Bytes of randomness in a key `--genkey` writes.
pub const GENERATED_KEY_LEN: usize = 32;

const TX_TO_RX: &[u8] = b"viamillipede v2 tx->rx";
const RX_TO_TX: &[u8] = b"viamillipede v2 rx->tx";
const TX_TO_RX_MAC: &[u8] = b"viamillipede v2 tx->rx mac";
const RX_TO_TX_MAC: &[u8] = b"viamillipede v2 rx->tx mac";
const DATAGRAMS: &[u8] = b"viamillipede v2 datagrams tx->rx";
const DATAGRAMS_MAC: &[u8] = b"viamillipede v2 datagrams tx->rx mac";

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

/// Whether a key file's bytes look like they came from a random source:
/// at least 32 random bytes, 64 hex digits, 43 base64 characters, or 40
/// printable characters from a generator; never words with spaces, and
/// never a few symbols repeated.
fn strength(secret: &[u8]) -> Result<(), String> {
    let distinct = {
        let mut seen = [false; 256];
        secret.iter().for_each(|&b| seen[b as usize] = true);
        seen.iter().filter(|&&s| s).count()
    };
    let text = secret.iter().all(|b| b.is_ascii_graphic() || *b == b' ');
    let (needed, have, symbols, kind) = if secret.iter().all(u8::is_ascii_hexdigit) {
        (2 * MIN_KEY_LEN, secret.len(), 10, "hex digits")
    } else if secret
        .iter()
        .all(|&b| b.is_ascii_alphanumeric() || b"+/=-_".contains(&b))
    {
        let chars = secret.iter().filter(|&&b| b != b'=').count();
        (MIN_KEY_LEN * 4 / 3, chars, 16, "base64 characters")
    } else if text && secret.contains(&b' ') {
        return Err("it looks like a passphrase, which could be guessed offline".into());
    } else if text {
        (40, secret.len(), 20, "printable characters")
    } else {
        (MIN_KEY_LEN, secret.len(), 16, "bytes")
    };
    if have < needed {
        return Err(format!(
            "{have} {kind} are too few (at least {needed}: {MIN_KEY_LEN} random bytes)"
        ));
    }
    if distinct < symbols {
        return Err(format!(
            "it has only {distinct} distinct symbols, not random ones"
        ));
    }
    Ok(())
}

impl Key {
    /// A key from its bytes, if they look random (see the module's notes).
    pub fn new(secret: &[u8]) -> Result<Key, String> {
        strength(secret)?;
        Ok(Key {
            secret: secret.to_vec(),
            mac: hmac::Key::new(hmac::HMAC_SHA256, secret),
        })
    }

    /// Reads a key file: its bytes, without a final line ending (so a hex
    /// key written by `echo` works; a binary key is taken whole). Returns
    /// the key and a warning if the file can be read by other users.
    pub fn load(path: &Path) -> Result<(Key, Option<String>), Error> {
        let shown = path.display();
        let bytes =
            std::fs::read(path).map_err(|e| Error::Usage(format!("read key file {shown}: {e}")))?;
        // Only a final line ending goes: a binary key may end in any byte.
        let key_bytes = bytes
            .strip_suffix(b"\r\n")
            .or_else(|| bytes.strip_suffix(b"\n"))
            .unwrap_or(&bytes);
        let key = Key::new(key_bytes).map_err(|e| {
            Error::Usage(format!(
                "key file {shown}: {e}; write a key with `viamillipede --genkey FILE` and copy it to both hosts"
            ))
        })?;
        Ok((key, loose_permissions(path)))
    }

    /// A new random key and its text (64 hex digits), as `--genkey` writes
    /// it and `viamillipede ssh` hands to the far side.
    pub fn random() -> Result<(Key, String), Error> {
        let mut raw = [0u8; GENERATED_KEY_LEN];
        SystemRandom::new()
            .fill(&mut raw)
            .map_err(|_| Error::Internal("the system has no source of randomness".into()))?;
        let text: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        let key = Key::new(text.as_bytes()).map_err(Error::Internal)?;
        Ok((key, text))
    }

    /// Writes a new random key to `path` (64 hex digits and a newline),
    /// readable by its owner only; an existing file is never replaced.
    pub fn generate(path: &Path) -> Result<(), Error> {
        let (_, mut text) = Key::random()?;
        text.push('\n');
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let shown = path.display();
        let mut file = options
            .open(path)
            .map_err(|e| Error::Usage(format!("--genkey {shown}: {e}")))?;
        std::io::Write::write_all(&mut file, text.as_bytes())
            .map_err(|e| Error::io(format!("write {shown}"), e))
    }

    /// A MAC under the key for one use (`label`) over length-prefixed
    /// `parts`, so moving bytes between parts changes it.
    pub fn mac(&self, label: &[u8], parts: &[&[u8]]) -> [u8; PROOF_LEN] {
        let mut ctx = hmac::Context::with_key(&self.mac);
        for p in std::iter::once(&label).chain(parts) {
            ctx.update(&(p.len() as u32).to_be_bytes());
            ctx.update(p);
        }
        ctx.sign()
            .as_ref()
            .try_into()
            .expect("HMAC-SHA256 is 32 bytes")
    }

    /// The protection of one connection's datagrams (`--udp`, tx to rx),
    /// from the same nonces as its frames but under a label of its own.
    pub fn datagrams(&self, tx_nonce: &[u8], rx_nonce: &[u8], encrypt: bool) -> DatagramKey {
        let salt: Vec<u8> = [tx_nonce, rx_nonce].concat();
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, &salt).extract(&self.secret);
        DatagramKey(if encrypt {
            let okm = prk
                .expand(&[DATAGRAMS], &aead::AES_256_GCM)
                .expect("HKDF output of one AES key length");
            Protection::Aead(aead::LessSafeKey::new(aead::UnboundKey::from(okm)))
        } else {
            let okm = prk
                .expand(&[DATAGRAMS_MAC], hmac::HMAC_SHA256)
                .expect("HKDF output of one HMAC key length");
            Protection::Mac(hmac::Key::from(okm))
        })
    }

    /// The protection of one connection's frames, for the side that is tx
    /// (`tx_side`) or rx: sealed when `encrypt`, else authenticated.
    pub fn channel(
        &self,
        tx_nonce: &[u8],
        rx_nonce: &[u8],
        tx_side: bool,
        encrypt: bool,
    ) -> (Sealer, Opener) {
        let salt: Vec<u8> = [tx_nonce, rx_nonce].concat();
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, &salt).extract(&self.secret);
        let derive = |info: &[u8], mac_info: &[u8]| -> Protection {
            if encrypt {
                let info = [info];
                let okm = prk
                    .expand(&info, &aead::AES_256_GCM)
                    .expect("HKDF output of one AES key length");
                Protection::Aead(aead::LessSafeKey::new(aead::UnboundKey::from(okm)))
            } else {
                let info = [mac_info];
                let okm = prk
                    .expand(&info, hmac::HMAC_SHA256)
                    .expect("HKDF output of one HMAC key length");
                Protection::Mac(hmac::Key::from(okm))
            }
        };
        let (send, recv) = if tx_side {
            (
                derive(TX_TO_RX, TX_TO_RX_MAC),
                derive(RX_TO_TX, RX_TO_TX_MAC),
            )
        } else {
            (
                derive(RX_TO_TX, RX_TO_TX_MAC),
                derive(TX_TO_RX, TX_TO_RX_MAC),
            )
        };
        (
            Sealer {
                key: send,
                counter: 0,
            },
            Opener {
                key: recv,
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

/// The next frame's counter; never wraps.
fn next(counter: &mut u64) -> u64 {
    let n = *counter;
    // 2^64 frames per connection is out of reach; never reuse one anyway.
    *counter = counter.checked_add(1).expect("frame counter exhausted");
    n
}

fn frame_nonce(n: u64) -> aead::Nonce {
    let mut b = [0u8; aead::NONCE_LEN];
    b[4..].copy_from_slice(&n.to_be_bytes());
    aead::Nonce::assume_unique_for_key(b)
}

fn frame_mac(key: &hmac::Key, n: u64, header: &[u8], payload: &[&[u8]]) -> [u8; TAG_LEN] {
    let mut ctx = hmac::Context::with_key(key);
    ctx.update(&n.to_be_bytes());
    ctx.update(header);
    for p in payload {
        ctx.update(p);
    }
    ctx.sign().as_ref()[..TAG_LEN]
        .try_into()
        .expect("16 of 32 bytes")
}

#[allow(
    clippy::large_enum_variant,
    reason = "one per connection and direction, never moved on the data path"
)]
enum Protection {
    Aead(aead::LessSafeKey),
    Mac(hmac::Key),
}

/// Protects the frames one side sends on one connection.
pub struct Sealer {
    key: Protection,
    counter: u64,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Sealer({}, {})", self.encrypts(), self.counter)
    }
}

impl Sealer {
    /// Whether frames are encrypted ([`Sealer::seal`]) rather than only
    /// authenticated ([`Sealer::sign`]).
    pub fn encrypts(&self) -> bool {
        matches!(self.key, Protection::Aead(_))
    }

    /// Encrypts `data` in place, authenticating `aad` too; returns the tag.
    /// Only for an encrypting sealer.
    pub fn seal(&mut self, aad: &[u8], data: &mut [u8]) -> [u8; TAG_LEN] {
        let Protection::Aead(key) = &self.key else {
            panic!("seal() on an authenticating sealer");
        };
        let n = next(&mut self.counter);
        let tag = key
            .seal_in_place_separate_tag(frame_nonce(n), aead::Aad::from(aad), data)
            .expect("AES-GCM seals any frame length used here");
        tag.as_ref().try_into().expect("16-byte tag")
    }

    /// A tag over `header` and the `payload` parts, which travel in the
    /// clear. Only for an authenticating sealer.
    pub fn sign(&mut self, header: &[u8], payload: &[&[u8]]) -> [u8; TAG_LEN] {
        let Protection::Mac(key) = &self.key else {
            panic!("sign() on an encrypting sealer");
        };
        frame_mac(key, next(&mut self.counter), header, payload)
    }
}

/// Checks (and, when sealed, decrypts) the frames one side receives on one
/// connection.
pub struct Opener {
    key: Protection,
    counter: u64,
}

impl std::fmt::Debug for Opener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Opener({})", self.counter)
    }
}

/// A frame failed its check: altered, replayed, reordered or forged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpenError;

impl std::fmt::Display for OpenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("frame failed authentication (altered, replayed or forged)")
    }
}

impl std::error::Error for OpenError {}

impl Opener {
    /// Checks `data` against `tag` with `header`, decrypting it in place on a
    /// sealed connection.
    pub fn open(
        &mut self,
        header: &[u8],
        data: &mut [u8],
        tag: &[u8; TAG_LEN],
    ) -> Result<(), OpenError> {
        let n = next(&mut self.counter);
        match &self.key {
            Protection::Aead(key) => key
                .open_in_place_separate_tag(
                    frame_nonce(n),
                    aead::Aad::from(header),
                    aead::Tag::from(*tag),
                    data,
                    0..,
                )
                .map(drop)
                .map_err(|_| OpenError),
            Protection::Mac(key) => {
                let want = frame_mac(key, n, header, &[data]);
                let same = want.iter().zip(tag).fold(0u8, |a, (x, y)| a | (x ^ y)) == 0;
                same.then_some(()).ok_or(OpenError)
            }
        }
    }
}

/// Protects the datagrams of one connection. Datagrams arrive out of order
/// and some not at all, so the nonce is the datagram's own counter, carried
/// in its header (which is the associated data, or under the MAC): a datagram
/// cannot be altered, forged or moved to another connection. A replayed one
/// is let through; it can only repeat bytes of the same piece at the same
/// place, which the receiver already has or needs.
pub struct DatagramKey(Protection);

impl std::fmt::Debug for DatagramKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DatagramKey(..)")
    }
}

impl DatagramKey {
    /// Seals `data` in place (or, without encryption, only signs it) under
    /// `counter`, with `header` authenticated too; returns the tag.
    pub fn protect(&self, counter: u64, header: &[u8], data: &mut [u8]) -> [u8; TAG_LEN] {
        match &self.0 {
            Protection::Aead(key) => {
                let tag = key
                    .seal_in_place_separate_tag(frame_nonce(counter), aead::Aad::from(header), data)
                    .expect("AES-GCM seals any datagram");
                tag.as_ref().try_into().expect("16-byte tag")
            }
            Protection::Mac(key) => frame_mac(key, counter, header, &[data]),
        }
    }

    /// Checks a datagram's `data` against `tag`, decrypting it in place.
    pub fn check(
        &self,
        counter: u64,
        header: &[u8],
        data: &mut [u8],
        tag: &[u8; TAG_LEN],
    ) -> Result<(), OpenError> {
        match &self.0 {
            Protection::Aead(key) => key
                .open_in_place_separate_tag(
                    frame_nonce(counter),
                    aead::Aad::from(header),
                    aead::Tag::from(*tag),
                    data,
                    0..,
                )
                .map(drop)
                .map_err(|_| OpenError),
            Protection::Mac(key) => {
                let want = frame_mac(key, counter, header, &[data]);
                let same = want.iter().zip(tag).fold(0u8, |a, (x, y)| a | (x ^ y)) == 0;
                same.then_some(()).ok_or(OpenError)
            }
        }
    }
}

/// A key for tests: 32 bytes that look random, the same for the same seed.
#[cfg(test)]
pub(crate) fn test_key(seed: u8) -> Key {
    Key::new(&tests::random_bytes(seed)).expect("random-looking bytes")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 32 bytes that look random.
    pub fn random_bytes(seed: u8) -> Vec<u8> {
        let mut x = u64::from(seed) | 0x9E37_79B9_0000_0000;
        (0..32)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    fn key(b: u8) -> Key {
        Key::new(&random_bytes(b)).unwrap()
    }

    #[test]
    fn weak_keys_are_refused_with_what_is_wrong() {
        for (secret, why) in [
            (&b"short"[..], "too few"),
            (b"correct horse battery staple, said the man", "passphrase"),
            (&[7u8; 40][..], "distinct"),
            (
                b"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
                "distinct",
            ),
            (b"0123456789abcdef0123456789abcdef", "too few"),
        ] {
            let e = Key::new(secret).unwrap_err();
            assert!(e.contains(why), "{secret:?}: {e}");
        }
        // What people make keys with.
        assert!(Key::new(&random_bytes(1)).is_ok());
        let hex: String = random_bytes(2).iter().map(|b| format!("{b:02x}")).collect();
        assert!(Key::new(hex.as_bytes()).is_ok());
        assert!(Key::new(b"Y2hhbmdlIHRoaXMgdG8gcmFuZG9tIGJ5dGVzIHBsZWFzZSE=").is_ok());
    }

    #[test]
    fn macs_depend_on_key_label_and_the_split_of_their_parts() {
        let (a, b) = (key(1), key(2));
        let m = a.mac(b"one", &[b"hello", b"nonce"]);
        assert!(proofs_match(&m, &a.mac(b"one", &[b"hello", b"nonce"])));
        assert!(!proofs_match(&m, &b.mac(b"one", &[b"hello", b"nonce"])));
        assert!(!proofs_match(&m, &a.mac(b"two", &[b"hello", b"nonce"])));
        assert!(!proofs_match(&m, &a.mac(b"one", &[b"hell", b"onnonce"])));
        assert!(!proofs_match(&m, &m[..31]));
    }

    #[test]
    fn frames_open_only_in_order_with_their_header_in_both_modes() {
        for encrypt in [true, false] {
            let k = key(3);
            let (mut tx_seal, mut tx_open) = k.channel(b"t", b"r", true, encrypt);
            let (_, mut rx_open) = k.channel(b"t", b"r", false, encrypt);
            let protect = |s: &mut Sealer, head: &[u8], data: &mut Vec<u8>| {
                if s.encrypts() {
                    s.seal(head, data)
                } else {
                    s.sign(head, &[data])
                }
            };
            let mut a = b"first foot".to_vec();
            let tag_a = protect(&mut tx_seal, b"header-a", &mut a);
            assert_eq!(a != b"first foot", encrypt, "encrypted only when asked");
            let mut b = b"second".to_vec();
            let tag_b = protect(&mut tx_seal, b"header-b", &mut b);
            // Out of order, or with another header: refused.
            let mut b2 = b.clone();
            assert_eq!(rx_open.open(b"header-b", &mut b2, &tag_b), Err(OpenError));
            let (_, mut rx_open) = k.channel(b"t", b"r", false, encrypt);
            let mut a2 = a.clone();
            assert_eq!(rx_open.open(b"header-x", &mut a2, &tag_a), Err(OpenError));
            let (_, mut rx_open) = k.channel(b"t", b"r", false, encrypt);
            let mut a3 = a.clone();
            a3[0] ^= 1;
            assert_eq!(rx_open.open(b"header-a", &mut a3, &tag_a), Err(OpenError));
            let (mut rx_seal, mut rx_open) = k.channel(b"t", b"r", false, encrypt);
            rx_open.open(b"header-a", &mut a, &tag_a).unwrap();
            assert_eq!(&a[..], b"first foot");
            rx_open.open(b"header-b", &mut b, &tag_b).unwrap();
            assert_eq!(&b[..], b"second");
            // The other direction has keys of its own.
            let mut ack = Vec::new();
            let tag = protect(&mut rx_seal, b"ack", &mut ack);
            tx_open.open(b"ack", &mut ack, &tag).unwrap();
            let (mut other, _) = k.channel(b"t", b"R", false, encrypt);
            let tag = protect(&mut other, b"ack", &mut ack);
            assert_eq!(tx_open.open(b"ack", &mut ack, &tag), Err(OpenError));
        }
    }

    #[test]
    fn key_files_lose_trailing_newlines_warn_when_readable_and_generate() {
        let dir = std::env::temp_dir().join(format!("vm-key-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("key");
        let hex: String = random_bytes(4).iter().map(|b| format!("{b:02x}")).collect();
        std::fs::write(&path, format!("{hex}\n")).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
            let (k, warning) = Key::load(&path).unwrap();
            assert_eq!(k, Key::new(hex.as_bytes()).unwrap());
            assert!(warning.unwrap().contains("chmod 600"));
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
            assert!(Key::load(&path).unwrap().1.is_none());
        }
        // A binary key is taken whole, whatever bytes it ends with.
        let mut binary = random_bytes(5);
        binary.push(b'\t');
        std::fs::write(&path, &binary).unwrap();
        assert_eq!(Key::load(&path).unwrap().0, Key::new(&binary).unwrap());
        std::fs::write(&path, b"my secret passphrase\n").unwrap();
        match Key::load(&path) {
            Err(Error::Usage(m)) => assert!(m.contains("--genkey"), "{m}"),
            other => panic!("{other:?}"),
        }
        // --genkey writes a key that loads, private, and never overwrites.
        let new = dir.join("new");
        Key::generate(&new).unwrap();
        let (_, warning) = Key::load(&new).unwrap();
        assert!(warning.is_none(), "{warning:?}");
        assert!(Key::generate(&new).is_err(), "an existing key was replaced");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_datagram_opens_only_unaltered_under_its_own_connection_and_counter() {
        for encrypt in [false, true] {
            let k = key(4).datagrams(&[1; 32], &[2; 32], encrypt);
            let other = key(4).datagrams(&[1; 32], &[3; 32], encrypt);
            let header = b"header";
            let plain = b"some bytes of a piece".to_vec();
            let mut data = plain.clone();
            let tag = k.protect(7, header, &mut data);
            assert_eq!(data != plain, encrypt, "sealed only with encryption");
            let open = |k: &DatagramKey, counter, header: &[u8], data: &[u8], tag| {
                let mut d = data.to_vec();
                k.check(counter, header, &mut d, tag).map(|()| d)
            };
            assert_eq!(open(&k, 7, header, &data, &tag), Ok(plain.clone()));
            assert_eq!(open(&k, 8, header, &data, &tag), Err(OpenError));
            assert_eq!(open(&k, 7, b"headex", &data, &tag), Err(OpenError));
            assert_eq!(open(&other, 7, header, &data, &tag), Err(OpenError));
            let mut flipped = data.clone();
            flipped[3] ^= 1;
            assert_eq!(open(&k, 7, header, &flipped, &tag), Err(OpenError));
        }
    }
}
