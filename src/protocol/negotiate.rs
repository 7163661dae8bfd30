//! Both ends of the per-connection handshake as state machines without I/O:
//! bytes in, bytes out, and an outcome that says exactly what was agreed.
//! The blocking code in `tx::worker` and `rx::conn` only reads and writes
//! what these return, so the whole matrix of keys, options and refusals,
//! and a man in the middle who tampers with, drops or replays any byte,
//! can be run in memory (see the tests below).
//!
//! ```text
//! without a key:  tx Hello ------------------------------> rx
//!                 tx <------------------ Reply (the verdict) rx
//!
//! with a key:     tx Hello (tx nonce) ---------------------> rx
//!                 tx <-------- Challenge (rx nonce, rx proof) rx
//!                 tx proof -------------------------------> rx
//!                 tx <---------- Reply (the verdict, its MAC) rx
//! ```
//!
//! With a key, rx proves it first (an HMAC over the hello and the
//! challenge, which carries its receiver id), then tx proves it over the
//! transcript, and the verdict (status, flags, delivered, receiver id,
//! message) carries an HMAC over everything before it: tx acts on none of
//! its fields before checking it. Each proof has its own label, so one side's
//! proof never serves as the other's, and fresh nonces from both sides mean
//! no recorded handshake can be replayed. Every outcome says whether the
//! peer proved the key ([`Refusal::proven`]): a refusal from a peer that has
//! not proved it may be anyone, and must not end a stream.
//!
//! Without a key nothing can be proved: the reply is taken as it comes, and
//! every refusal is unproven.

use super::handshake::{
    Hello, Reason, Reply, Status, FLAG_AUTH, FLAG_CHECKSUMS, FLAG_ENCRYPT, FLAG_NAME, FLAG_UDP,
    KNOWN_FLAGS, UDP_TERMS_LEN, VERSION,
};
use super::HandshakeError;
use crate::crypto::{proofs_match, Key, NONCE_LEN, PROOF_LEN};

const RX_PROOF: &[u8] = b"viamillipede v2 rx proof";
const TX_PROOF: &[u8] = b"viamillipede v2 tx proof";
const RX_VERDICT: &[u8] = b"viamillipede v2 rx verdict";

/// What one side asks for, on every connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Terms {
    /// The 4-byte phrase both sides must share.
    pub checkphrase: [u8; 4],
    /// The pre-shared key, if any.
    pub key: Option<Key>,
    /// Asks for encryption (needs a key).
    pub encrypt: bool,
    /// Asks for per-foot checksums.
    pub checksums: bool,
    /// tx: asks to send feet as datagrams (rx offers it to whoever asks).
    pub udp: bool,
}

/// Where and how a connection's feet go as datagrams (`--udp`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UdpTerms {
    /// rx's UDP port (on the address the TCP connection reached).
    pub port: u16,
    /// The token every datagram of this connection carries.
    pub token: u64,
}

impl UdpTerms {
    fn encode(&self) -> [u8; UDP_TERMS_LEN] {
        let mut b = [0u8; UDP_TERMS_LEN];
        b[..2].copy_from_slice(&self.port.to_be_bytes());
        b[2..].copy_from_slice(&self.token.to_be_bytes());
        b
    }

    fn decode(b: &[u8]) -> UdpTerms {
        UdpTerms {
            port: u16::from_be_bytes([b[0], b[1]]),
            token: u64::from_be_bytes(b[2..10].try_into().expect("8 bytes")),
        }
    }
}

/// What tx offers on one connection.
#[derive(Clone, Debug)]
pub struct Offer {
    /// tx's side of the terms.
    pub terms: Terms,
    /// The stream's session id.
    pub session: [u8; 16],
    /// Largest foot.
    pub foot_size: u32,
    /// The window, in feet.
    pub window: u32,
    /// Which worker opens the connection.
    pub worker: u16,
    /// The stream's name (`--name`), checked by [`super::check_name`].
    pub name: Option<String>,
}

/// The name a hello carries (`--name`), once [`RxNegotiation`] has let
/// the hello through (it refuses a malformed one).
pub fn name_of(hello: &Hello) -> Option<String> {
    if hello.flags & FLAG_NAME == 0 {
        return None;
    }
    let skip = match hello.flags & FLAG_AUTH {
        0 => 0,
        _ => NONCE_LEN,
    };
    let bytes = hello.extension.get(skip..)?;
    std::str::from_utf8(bytes).ok().map(String::from)
}

/// The keys one connection's frames are protected with, once both sides
/// proved the key: both nonces, from which each direction's keys derive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Nonces {
    /// tx's nonce, from its hello.
    pub tx: [u8; NONCE_LEN],
    /// rx's nonce, from its challenge.
    pub rx: [u8; NONCE_LEN],
}

/// What a handshake agreed, as both sides see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Agreed {
    /// Every foot below this was written by rx when it answered.
    pub delivered: u64,
    /// The receiving process's id.
    pub receiver: [u8; 8],
    /// With a key: the nonces the frames' keys derive from (every frame is
    /// then authenticated, and sealed if `encrypt`).
    pub nonces: Option<Nonces>,
    /// Frames are encrypted.
    pub encrypt: bool,
    /// Feet carry checksums.
    pub checksums: bool,
    /// Feet go as datagrams, on these terms.
    pub udp: Option<UdpTerms>,
}

/// Why a handshake did not agree.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// The reason code (rx's, or [`Reason::Other`] for a broken reply).
    pub reason: Reason,
    /// What went wrong, for the user.
    pub message: String,
    /// Whether the peer proved the key before refusing: only then may the
    /// refusal end a stream.
    pub proven: bool,
}

impl Refusal {
    fn unproven(reason: Reason, message: impl Into<String>) -> Refusal {
        Refusal {
            reason,
            message: message.into(),
            proven: false,
        }
    }
}

/// What tx must do next.
#[derive(Debug, PartialEq, Eq)]
pub enum TxStep {
    /// Send these bytes (the proof), then read rx's next message.
    Send(Vec<u8>),
    /// The connection may carry feet on these terms.
    Accepted(Agreed),
    /// The stream is already complete: rx wrote every byte, this many.
    Complete {
        /// Bytes rx wrote.
        bytes: u64,
        /// Whether rx proved the key.
        proven: bool,
    },
    /// No agreement on this connection.
    Refused(Refusal),
}

#[derive(Debug)]
enum TxState {
    /// The hello is sent; rx's reply (or challenge) comes next.
    Hello,
    /// The proof is sent; the verdict comes next.
    Proved {
        challenge: Vec<u8>,
        proof: [u8; PROOF_LEN],
        rx_nonce: [u8; NONCE_LEN],
    },
    Done,
}

/// tx's end of one handshake.
#[derive(Debug)]
pub struct TxNegotiation {
    terms: Terms,
    hello: Vec<u8>,
    nonce: Option<[u8; NONCE_LEN]>,
    state: TxState,
}

impl TxNegotiation {
    /// Starts a handshake; returns it and the hello to send. `nonce` must be
    /// fresh and random when there is a key (and is unused without one).
    pub fn new(offer: &Offer, nonce: [u8; NONCE_LEN]) -> (TxNegotiation, Vec<u8>) {
        let t = &offer.terms;
        let nonce = t.key.as_ref().map(|_| nonce);
        let mut flags = 0;
        if nonce.is_some() {
            flags |= FLAG_AUTH;
        }
        if t.encrypt {
            flags |= FLAG_ENCRYPT;
        }
        if t.checksums {
            flags |= FLAG_CHECKSUMS;
        }
        if t.udp {
            flags |= FLAG_UDP;
        }
        let mut extension = nonce.map(Vec::from).unwrap_or_default();
        if let Some(name) = &offer.name {
            flags |= FLAG_NAME;
            extension.extend_from_slice(name.as_bytes());
        }
        let hello = Hello {
            flags,
            checkphrase: t.checkphrase,
            session: offer.session,
            foot_size: offer.foot_size,
            window: offer.window,
            worker: offer.worker,
            extension,
        };
        let mut bytes = Vec::new();
        hello.encode(&mut bytes);
        let n = TxNegotiation {
            terms: t.clone(),
            hello: bytes.clone(),
            nonce,
            state: TxState::Hello,
        };
        (n, bytes)
    }

    /// Takes rx's next message, whole (see [`Reply::decode`] for its length).
    pub fn on_reply(&mut self, bytes: &[u8]) -> TxStep {
        let state = std::mem::replace(&mut self.state, TxState::Done);
        let reply = match Reply::decode(bytes) {
            Ok((r, n)) if n == bytes.len() => r,
            Ok(_) => return TxStep::Refused(Refusal::unproven(Reason::Other, "overlong reply")),
            Err(e) => return TxStep::Refused(Refusal::unproven(Reason::Other, e.to_string())),
        };
        match (state, self.terms.key.clone()) {
            (TxState::Hello, None) => self.verdict(&reply, None, false),
            (TxState::Hello, Some(key)) => self.on_challenge(&key, bytes, &reply),
            (
                TxState::Proved {
                    challenge,
                    proof,
                    rx_nonce,
                },
                Some(key),
            ) => {
                // Nothing in the verdict counts until its MAC does.
                let body = &bytes[..bytes.len().saturating_sub(PROOF_LEN)];
                let mac = key.mac(RX_VERDICT, &[&self.hello, &challenge, &proof, body]);
                let ext = &reply.extension;
                let tail = &ext[ext.len().saturating_sub(PROOF_LEN)..];
                if ext.len() < PROOF_LEN || !proofs_match(&mac, tail) {
                    return TxStep::Refused(Refusal::unproven(
                        Reason::Auth,
                        "the receiver's answer failed authentication (altered on the way, or not from the receiver that proved the key)",
                    ));
                }
                let nonces = Nonces {
                    tx: self.nonce.expect("a keyed handshake has a nonce"),
                    rx: rx_nonce,
                };
                self.verdict(&reply, Some(nonces), true)
            }
            (_, _) => TxStep::Refused(Refusal::unproven(
                Reason::Other,
                "a reply after the handshake ended",
            )),
        }
    }

    fn on_challenge(&mut self, key: &Key, bytes: &[u8], reply: &Reply) -> TxStep {
        match reply.status {
            Status::Challenge => {}
            Status::Reject => {
                // Before rx proved the key: anyone could have sent it.
                return TxStep::Refused(Refusal::unproven(reply.reason, reply.message.clone()));
            }
            Status::Accept | Status::Complete => {
                return TxStep::Refused(Refusal::unproven(
                    Reason::Auth,
                    "the receiver did not authenticate itself: give it --key-file too",
                ))
            }
        }
        let ext = &reply.extension;
        if ext.len() != NONCE_LEN + PROOF_LEN {
            return TxStep::Refused(Refusal::unproven(
                Reason::Auth,
                "malformed authentication challenge",
            ));
        }
        let (nonce, proof) = ext.split_at(NONCE_LEN);
        let signed = &bytes[..bytes.len() - PROOF_LEN];
        if !proofs_match(&key.mac(RX_PROOF, &[&self.hello, signed]), proof) {
            return TxStep::Refused(Refusal::unproven(
                Reason::Auth,
                "the receiver could not prove the key: the key files differ",
            ));
        }
        let tx_proof = key.mac(TX_PROOF, &[&self.hello, bytes]);
        self.state = TxState::Proved {
            challenge: bytes.to_vec(),
            proof: tx_proof,
            rx_nonce: nonce.try_into().expect("split at the nonce length"),
        };
        TxStep::Send(tx_proof.to_vec())
    }

    /// The verdict, checked against what tx asked for.
    fn verdict(&self, reply: &Reply, nonces: Option<Nonces>, proven: bool) -> TxStep {
        let refuse = |reason, message: &str| {
            TxStep::Refused(Refusal {
                reason,
                message: message.into(),
                proven,
            })
        };
        match reply.status {
            Status::Accept => {}
            Status::Complete => {
                return TxStep::Complete {
                    bytes: reply.delivered,
                    proven,
                }
            }
            Status::Reject => {
                return TxStep::Refused(Refusal {
                    reason: reply.reason,
                    message: reply.message.clone(),
                    proven,
                })
            }
            Status::Challenge => {
                return match nonces {
                    None => refuse(
                        Reason::Auth,
                        "the receiver requires a key: give --key-file on both sides",
                    ),
                    Some(_) => refuse(Reason::Other, "a second challenge"),
                }
            }
        }
        if reply.flags & !(FLAG_ENCRYPT | FLAG_CHECKSUMS | FLAG_UDP) != 0 {
            return refuse(Reason::Other, "the receiver accepted with unknown flags");
        }
        let mac_len = if proven { PROOF_LEN } else { 0 };
        let udp = match reply.flags & FLAG_UDP != 0 {
            true if reply.extension.len() == UDP_TERMS_LEN + mac_len => {
                Some(UdpTerms::decode(&reply.extension))
            }
            true => return refuse(Reason::Other, "malformed UDP terms"),
            false if reply.extension.len() != mac_len => {
                return refuse(Reason::Other, "unexpected data in the receiver's answer")
            }
            false => None,
        };
        if udp.is_some() && !self.terms.udp {
            return refuse(
                Reason::Other,
                "the receiver offered UDP, which was not asked for",
            );
        }
        if self.terms.udp && udp.is_none() {
            let why = match reply.message.is_empty() {
                true => String::new(),
                false => format!(": {}", reply.message),
            };
            return TxStep::Refused(Refusal {
                reason: Reason::Other,
                message: format!("the receiver did not agree to send feet over UDP{why}"),
                proven,
            });
        }
        let encrypt = reply.flags & FLAG_ENCRYPT != 0;
        let checksums = reply.flags & FLAG_CHECKSUMS != 0;
        if self.terms.encrypt && !encrypt {
            return refuse(Reason::Auth, "the receiver did not agree to encrypt");
        }
        if encrypt && nonces.is_none() {
            return refuse(Reason::Auth, "encryption without a key");
        }
        if self.terms.checksums && !checksums {
            return refuse(Reason::Other, "the receiver did not agree to checksums");
        }
        TxStep::Accepted(Agreed {
            delivered: reply.delivered,
            receiver: reply.receiver,
            nonces,
            encrypt,
            checksums,
            udp,
        })
    }
}

/// rx's verdict on a sender, decided by the shared state outside the
/// machine (which session it serves, how far it has written).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Serve it; every foot below `delivered` is written.
    Accept {
        /// Feet written so far.
        delivered: u64,
        /// When the sender asked for UDP: rx's port and the token, or None
        /// when rx cannot offer it (the reply then says so).
        udp: Option<UdpTerms>,
    },
    /// Every byte (this many) is written already.
    Complete(u64),
    /// Refuse it.
    Reject(Reason, String),
}

/// What rx must do next.
#[derive(Debug, PartialEq, Eq)]
pub enum RxStep {
    /// Send this challenge, then read tx's proof ([`PROOF_LEN`] bytes).
    Challenge(Vec<u8>),
    /// The sender may be admitted: decide with [`RxNegotiation::decide`].
    Decide(Hello),
    /// Send this refusal and close; the string says why, for the log.
    Refuse(Vec<u8>, String),
    /// Close without a word (the peer is not worth one).
    Drop(String),
}

#[derive(Debug)]
enum RxState {
    Hello,
    Challenged {
        hello: Hello,
        hello_bytes: Vec<u8>,
        challenge: Vec<u8>,
    },
    Deciding {
        hello: Hello,
        transcript: Option<(Vec<u8>, Vec<u8>, [u8; PROOF_LEN])>,
    },
    Done,
}

/// rx's end of one handshake.
#[derive(Debug)]
pub struct RxNegotiation {
    terms: Terms,
    receiver: [u8; 8],
    nonce: [u8; NONCE_LEN],
    state: RxState,
}

impl RxNegotiation {
    /// A handshake for a receiver with `terms` and id `receiver`; `nonce`
    /// must be fresh and random when there is a key.
    pub fn new(terms: Terms, receiver: [u8; 8], nonce: [u8; NONCE_LEN]) -> RxNegotiation {
        RxNegotiation {
            terms,
            receiver,
            nonce,
            state: RxState::Hello,
        }
    }

    fn reject(&self, reason: Reason, message: &str) -> RxStep {
        let mut r = Reply::reject(reason, message);
        r.receiver = self.receiver;
        let mut b = Vec::new();
        r.encode(&mut b);
        RxStep::Refuse(b, message.into())
    }

    /// Takes tx's hello, whole (see [`Hello::decode`]).
    pub fn on_hello(&mut self, bytes: &[u8]) -> RxStep {
        self.state = RxState::Done;
        let hello = match Hello::decode(bytes) {
            Ok((h, n)) if n == bytes.len() => h,
            Ok(_) => return RxStep::Drop("overlong hello".into()),
            Err(HandshakeError::Version(v)) => {
                let msg = format!(
                    "protocol version {v} is not supported (this receiver speaks {VERSION})"
                );
                return self.reject(Reason::Version, &msg);
            }
            Err(e) => return RxStep::Drop(e.to_string()),
        };
        if hello.checkphrase != self.terms.checkphrase {
            return self.reject(Reason::Checkphrase, "checkphrase mismatch");
        }
        if hello.flags & !KNOWN_FLAGS != 0 {
            let msg = format!("unsupported feature flags {:#06x}", hello.flags);
            return self.reject(Reason::Other, &msg);
        }
        let auth = hello.flags & FLAG_AUTH != 0;
        let nonce_len = if auth { NONCE_LEN } else { 0 };
        match hello.flags & FLAG_NAME != 0 {
            true => {
                let name = hello.extension.get(nonce_len..).unwrap_or_default();
                let checked = std::str::from_utf8(name)
                    .map_err(|_| "the name is not UTF-8".to_string())
                    .and_then(super::check_name);
                if let Err(e) = checked {
                    return self.reject(Reason::Parameters, &format!("bad stream name: {e}"));
                }
            }
            false if hello.extension.len() != nonce_len => {
                let what = match auth {
                    true => "malformed authentication data",
                    false => "unexpected extension data in the hello",
                };
                return self.reject(Reason::Auth, what);
            }
            false => {}
        }
        let Some(key) = self.terms.key.clone() else {
            if auth {
                return self.reject(
                    Reason::Auth,
                    "this receiver has no key: give it --key-file too",
                );
            }
            if hello.flags & FLAG_ENCRYPT != 0 {
                return self.reject(Reason::Auth, "encryption needs a key on both sides");
            }
            self.state = RxState::Deciding {
                hello: hello.clone(),
                transcript: None,
            };
            return RxStep::Decide(hello);
        };
        if !auth {
            return self.reject(
                Reason::Auth,
                "this receiver requires a key: give the sender --key-file",
            );
        }
        if hello.extension.len() < NONCE_LEN {
            return self.reject(Reason::Auth, "malformed authentication data");
        }
        let mut challenge = Reply::new(Status::Challenge, Reason::None, 0, String::new());
        challenge.receiver = self.receiver;
        challenge.extension = [&self.nonce[..], &[0; PROOF_LEN]].concat();
        let mut c = Vec::new();
        challenge.encode(&mut c);
        let signed = c.len() - PROOF_LEN;
        let proof = key.mac(RX_PROOF, &[bytes, &c[..signed]]);
        c[signed..].copy_from_slice(&proof);
        self.state = RxState::Challenged {
            hello,
            hello_bytes: bytes.to_vec(),
            challenge: c.clone(),
        };
        RxStep::Challenge(c)
    }

    /// What to do with a hello that could not be read: another version is
    /// told so (the first ten bytes mean the same in every version);
    /// anything else is not worth an answer.
    pub fn on_bad_hello(&mut self, e: HandshakeError) -> RxStep {
        self.state = RxState::Done;
        match e {
            HandshakeError::Version(v) => self.reject(
                Reason::Version,
                &format!("protocol version {v} is not supported (this receiver speaks {VERSION})"),
            ),
            other => RxStep::Drop(format!("dropped: {other}")),
        }
    }

    /// Takes tx's proof ([`PROOF_LEN`] bytes).
    pub fn on_proof(&mut self, proof: &[u8]) -> RxStep {
        let RxState::Challenged {
            hello,
            hello_bytes,
            challenge,
        } = std::mem::replace(&mut self.state, RxState::Done)
        else {
            return RxStep::Drop("a proof out of turn".into());
        };
        let key = self.terms.key.clone().expect("challenged with a key");
        let want = key.mac(TX_PROOF, &[&hello_bytes, &challenge]);
        if !proofs_match(&want, proof) {
            return self.reject(
                Reason::Auth,
                "authentication failed: the keys differ, or the handshake was replayed",
            );
        }
        self.state = RxState::Deciding {
            hello: hello.clone(),
            transcript: Some((hello_bytes, challenge, want)),
        };
        RxStep::Decide(hello)
    }

    /// Answers with the verdict; returns the reply to send and, when the
    /// sender is accepted, what was agreed (None otherwise).
    pub fn decide(&mut self, verdict: Verdict) -> (Vec<u8>, Option<Agreed>) {
        let receiver = self.receiver;
        self.decide_as(verdict, receiver)
    }

    /// [`RxNegotiation::decide`] for a relay, whose verdict names the
    /// receiver its next hop reached: the sender checks that every
    /// connection reaches the same one, through whichever relay.
    pub fn decide_as(&mut self, verdict: Verdict, receiver: [u8; 8]) -> (Vec<u8>, Option<Agreed>) {
        let RxState::Deciding { hello, transcript } =
            std::mem::replace(&mut self.state, RxState::Done)
        else {
            panic!("decide() without a hello to decide on");
        };
        let keyed = transcript.is_some();
        let encrypt = keyed && (hello.flags & FLAG_ENCRYPT != 0 || self.terms.encrypt);
        let checksums = hello.flags & FLAG_CHECKSUMS != 0 || self.terms.checksums;
        let mut udp = None;
        let mut reply = match &verdict {
            Verdict::Accept {
                delivered,
                udp: offered,
            } => {
                let mut r = Reply::accept(*delivered);
                if encrypt {
                    r.flags |= FLAG_ENCRYPT;
                }
                if checksums {
                    r.flags |= FLAG_CHECKSUMS;
                }
                if hello.flags & FLAG_UDP != 0 {
                    match offered {
                        Some(terms) => {
                            r.flags |= FLAG_UDP;
                            r.extension = terms.encode().to_vec();
                            udp = Some(*terms);
                        }
                        None => r.message = "this receiver could not open a UDP port".into(),
                    }
                }
                r
            }
            Verdict::Complete(bytes) => Reply::new(
                Status::Complete,
                Reason::None,
                *bytes,
                "stream complete".into(),
            ),
            Verdict::Reject(reason, msg) => Reply::reject(*reason, msg.clone()),
        };
        reply.receiver = receiver;
        let mut b = Vec::new();
        let mut nonces = None;
        if let Some((hello_bytes, challenge, proof)) = &transcript {
            let key = self.terms.key.as_ref().expect("a transcript needs a key");
            reply.extension.extend_from_slice(&[0; PROOF_LEN]);
            reply.encode(&mut b);
            let signed = b.len() - PROOF_LEN;
            let mac = key.mac(RX_VERDICT, &[hello_bytes, challenge, proof, &b[..signed]]);
            b[signed..].copy_from_slice(&mac);
            nonces = Some(Nonces {
                tx: hello.extension[..NONCE_LEN]
                    .try_into()
                    .expect("checked nonce length"),
                rx: self.nonce,
            });
        } else {
            reply.encode(&mut b);
        }
        let agreed = matches!(verdict, Verdict::Accept { .. }).then(|| Agreed {
            delivered: reply.delivered,
            receiver,
            nonces,
            encrypt,
            checksums,
            udp,
        });
        (b, agreed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RECEIVER: [u8; 8] = *b"rx-proc!";

    fn key(b: u8) -> Key {
        crate::crypto::test_key(b)
    }

    fn offer(terms: Terms) -> Offer {
        Offer {
            terms,
            session: [9; 16],
            foot_size: 1 << 20,
            window: 64,
            worker: 3,
            name: None,
        }
    }

    /// How a handshake ended, on both sides.
    #[derive(Debug, PartialEq)]
    struct Ends {
        tx: TxStep,
        rx: Option<Agreed>,
    }

    /// Which message a man in the middle touches: 0 hello, 1 challenge (or
    /// the verdict without a key), 2 proof, 3 verdict.
    type Mitm<'a> = &'a mut dyn FnMut(usize, &mut Vec<u8>) -> bool;

    /// Runs one handshake through `mitm`, which may change a message in
    /// place or drop it (return false). `nonces` are tx's and rx's.
    fn pair(tx: &Terms, rx: &Terms, verdict: &Verdict, nonces: (u8, u8), mitm: Mitm<'_>) -> Ends {
        let dropped = || Ends {
            tx: TxStep::Refused(Refusal::unproven(Reason::Other, "no answer")),
            rx: None,
        };
        let (mut t, mut hello) = TxNegotiation::new(&offer(tx.clone()), [nonces.0; NONCE_LEN]);
        let mut r = RxNegotiation::new(rx.clone(), RECEIVER, [nonces.1; NONCE_LEN]);
        if !mitm(0, &mut hello) {
            return dropped();
        }
        let mut step = r.on_hello(&hello);
        let mut index = 1;
        if let RxStep::Challenge(mut c) = step {
            if !mitm(1, &mut c) {
                return dropped();
            }
            let mut proof = match t.on_reply(&c) {
                TxStep::Send(p) => p,
                other => {
                    return Ends {
                        tx: other,
                        rx: None,
                    }
                }
            };
            if !mitm(2, &mut proof) {
                return dropped();
            }
            step = r.on_proof(&proof);
            index = 3;
        }
        let (mut last, agreed) = match step {
            RxStep::Decide(_) => r.decide(verdict.clone()),
            RxStep::Refuse(b, _) => (b, None),
            RxStep::Drop(_) => return dropped(),
            RxStep::Challenge(_) => panic!("a second challenge"),
        };
        if !mitm(index, &mut last) {
            return Ends {
                tx: dropped().tx,
                rx: agreed,
            };
        }
        Ends {
            tx: t.on_reply(&last),
            rx: agreed,
        }
    }

    fn clean(tx: &Terms, rx: &Terms, verdict: &Verdict) -> Ends {
        pair(tx, rx, verdict, (1, 2), &mut |_, _| true)
    }

    /// What must happen, from the terms alone.
    fn expected(tx: &Terms, rx: &Terms, verdict: &Verdict) -> Result<(TxStep, bool), Reason> {
        if tx.checkphrase != rx.checkphrase {
            return Err(Reason::Checkphrase);
        }
        let keyed = match (&tx.key, &rx.key) {
            (Some(a), Some(b)) if a == b => true,
            (None, None) => false,
            _ => return Err(Reason::Auth),
        };
        if !keyed && tx.encrypt {
            return Err(Reason::Auth);
        }
        Ok(match verdict {
            Verdict::Accept { udp: None, .. } if tx.udp => (
                TxStep::Refused(Refusal {
                    reason: Reason::Other,
                    message: "the receiver did not agree to send feet over UDP: this receiver could not open a UDP port".into(),
                    proven: keyed,
                }),
                true,
            ),
            Verdict::Accept { delivered, udp } => (
                TxStep::Accepted(Agreed {
                    delivered: *delivered,
                    receiver: RECEIVER,
                    nonces: keyed.then_some(Nonces {
                        tx: [1; NONCE_LEN],
                        rx: [2; NONCE_LEN],
                    }),
                    encrypt: keyed && (tx.encrypt || rx.encrypt),
                    checksums: tx.checksums || rx.checksums,
                    udp: udp.filter(|_| tx.udp),
                }),
                true,
            ),
            Verdict::Complete(bytes) => (
                TxStep::Complete {
                    bytes: *bytes,
                    proven: keyed,
                },
                false,
            ),
            Verdict::Reject(reason, msg) => (
                TxStep::Refused(Refusal {
                    reason: *reason,
                    message: msg.clone(),
                    proven: keyed,
                }),
                false,
            ),
        })
    }

    fn all_terms() -> Vec<(Terms, Terms)> {
        let keys = [
            (None, None),
            (Some(key(1)), Some(key(1))),
            (Some(key(1)), Some(key(2))),
            (Some(key(1)), None),
            (None, Some(key(1))),
        ];
        let mut out = Vec::new();
        for (tk, rk) in keys {
            for bits in 0..64u8 {
                let b = |i: u8| bits & (1 << i) != 0;
                let terms = |key: &Option<Key>, enc, sums, cp: bool, udp| Terms {
                    checkphrase: if cp { *b"abcd" } else { *b"wxyz" },
                    key: key.clone(),
                    encrypt: enc && key.is_some(),
                    checksums: sums,
                    udp,
                };
                out.push((
                    terms(&tk, b(0), b(1), true, b(5)),
                    terms(&rk, b(2), b(3), !b(4), false),
                ));
            }
        }
        out
    }

    fn verdicts() -> [Verdict; 4] {
        [
            Verdict::Accept {
                delivered: 12,
                udp: None,
            },
            Verdict::Accept {
                delivered: 12,
                udp: Some(UdpTerms {
                    port: 8834,
                    token: 0xfeed,
                }),
            },
            Verdict::Reject(
                Reason::Busy,
                "busy: another stream is in progress on this receiver".into(),
            ),
            Verdict::Complete(123_456),
        ]
    }

    #[test]
    fn the_whole_matrix_agrees_on_exactly_what_both_sides_asked_for() {
        let mut cases = 0;
        for (tx, rx) in all_terms() {
            for verdict in verdicts() {
                cases += 1;
                let ends = clean(&tx, &rx, &verdict);
                match expected(&tx, &rx, &verdict) {
                    Ok((step, rx_agrees)) => {
                        assert_eq!(ends.tx, step, "{tx:?} / {rx:?} / {verdict:?}");
                        assert_eq!(ends.rx.is_some(), rx_agrees, "{tx:?} / {rx:?}");
                        if let (TxStep::Accepted(a), Some(b)) = (&ends.tx, &ends.rx) {
                            assert_eq!(a, b, "both sides agree on the same terms");
                        }
                    }
                    Err(reason) => match &ends.tx {
                        TxStep::Refused(r) => {
                            assert_eq!(r.reason, reason, "{tx:?} / {rx:?}: {r:?}");
                            assert!(!r.proven, "{r:?}");
                            assert!(!r.message.is_empty());
                            assert!(ends.rx.is_none());
                        }
                        other => panic!("{tx:?} / {rx:?}: {other:?}"),
                    },
                }
            }
        }
        assert_eq!(cases, 5 * 64 * 4);
    }

    #[test]
    fn another_protocol_version_is_refused_with_a_reason() {
        let t = Terms {
            checkphrase: [0; 4],
            key: None,
            encrypt: false,
            checksums: false,
            udp: false,
        };
        let ends = pair(&t, &t, &verdicts()[0], (1, 2), &mut |i, m| {
            if i == 0 {
                m[9] ^= 7;
            }
            true
        });
        match ends.tx {
            TxStep::Refused(r) => {
                assert_eq!(r.reason, Reason::Version);
                assert!(r.message.contains("not supported"), "{}", r.message);
            }
            other => panic!("{other:?}"),
        }
    }

    /// With a key, a man in the middle changes nothing that counts: every
    /// bit of every message flipped, each message dropped, or replayed from
    /// another handshake, ends in the same agreement as without him or in a
    /// refusal that tx knows is unproven (so it cannot end a stream).
    #[test]
    fn with_a_key_no_tampered_dropped_or_replayed_byte_bends_the_handshake() {
        let k = Some(key(1));
        let mut checked = 0;
        for (tx, rx) in all_terms() {
            if tx.key != k || rx.key != k || tx.checkphrase != rx.checkphrase {
                continue;
            }
            for verdict in verdicts() {
                let honest = clean(&tx, &rx, &verdict);
                // The messages of another handshake, for replays.
                let mut recorded: Vec<Vec<u8>> = vec![Vec::new(); 4];
                pair(&tx, &rx, &verdict, (5, 6), &mut |i, m| {
                    recorded[i] = m.clone();
                    true
                });
                let judge = |ends: Ends, what: &str| match &ends.tx {
                    TxStep::Refused(r) if !r.proven => {}
                    _ => assert_eq!(ends.tx, honest.tx, "{what}: {tx:?} / {rx:?}"),
                };
                for (msg, message) in recorded.iter().enumerate() {
                    let len = message.len();
                    for byte in 0..len {
                        for bit in [0x01u8, 0x80] {
                            let ends = pair(&tx, &rx, &verdict, (1, 2), &mut |i, m| {
                                if i == msg && byte < m.len() {
                                    m[byte] ^= bit;
                                }
                                true
                            });
                            judge(ends, &format!("message {msg} byte {byte} ^ {bit:#x}"));
                            checked += 1;
                        }
                    }
                    let ends = pair(&tx, &rx, &verdict, (1, 2), &mut |i, _| i != msg);
                    judge(ends, &format!("message {msg} dropped"));
                    let ends = pair(&tx, &rx, &verdict, (1, 2), &mut |i, m| {
                        if i == msg {
                            *m = message.clone();
                        }
                        true
                    });
                    judge(ends, &format!("message {msg} replayed"));
                    // Cut short, or with bytes after it.
                    let ends = pair(&tx, &rx, &verdict, (1, 2), &mut |i, m| {
                        if i == msg {
                            m.pop();
                        }
                        true
                    });
                    judge(ends, &format!("message {msg} cut"));
                    let ends = pair(&tx, &rx, &verdict, (1, 2), &mut |i, m| {
                        if i == msg {
                            m.push(0);
                        }
                        true
                    });
                    judge(ends, &format!("message {msg} extended"));
                }
            }
        }
        assert!(checked > 10_000, "{checked} tamperings");
    }

    /// Without a key nothing can be proved: a tampered reply may change what
    /// tx agrees to (as the README says), but nothing panics and no refusal
    /// ever passes for a proven one.
    #[test]
    fn without_a_key_nothing_is_ever_proven() {
        let t = Terms {
            checkphrase: *b"abcd",
            key: None,
            encrypt: false,
            checksums: true,
            udp: false,
        };
        for verdict in verdicts() {
            for msg in 0..2 {
                for byte in 0..60 {
                    let ends = pair(&t, &t, &verdict, (1, 2), &mut |i, m| {
                        if i == msg && byte < m.len() {
                            m[byte] ^= 0xff;
                        }
                        true
                    });
                    match ends.tx {
                        TxStep::Refused(r) => assert!(!r.proven),
                        TxStep::Complete { proven, .. } => assert!(!proven),
                        TxStep::Accepted(a) => assert!(a.nonces.is_none()),
                        TxStep::Send(_) => panic!("a proof without a key"),
                    }
                }
            }
        }
    }

    #[test]
    fn a_proof_from_the_wrong_side_is_refused() {
        // rx's proof sent back as tx's: the labels differ.
        let k = Terms {
            checkphrase: [0; 4],
            key: Some(key(3)),
            encrypt: false,
            checksums: false,
            udp: false,
        };
        let mut challenge = Vec::new();
        let ends = pair(&k, &k, &verdicts()[0], (1, 2), &mut |i, m| {
            if i == 1 {
                challenge = m.clone();
            }
            if i == 2 {
                *m = challenge[challenge.len() - PROOF_LEN..].to_vec();
            }
            true
        });
        match ends.tx {
            TxStep::Refused(r) => assert!(!r.proven && r.reason == Reason::Auth, "{r:?}"),
            other => panic!("{other:?}"),
        }
        assert!(ends.rx.is_none());
    }

    /// rx's view of a hello named `name`: the name it would hand on, or
    /// how the hello was refused; `tamper` flips a bit that many bytes
    /// from the hello's end.
    fn named(
        name: Option<&str>,
        key: Option<Key>,
        tamper: Option<usize>,
    ) -> Result<Option<String>, String> {
        let t = Terms {
            checkphrase: [0; 4],
            key,
            encrypt: false,
            checksums: false,
            udp: false,
        };
        let mut o = offer(t.clone());
        o.name = name.map(String::from);
        let (mut tx, mut hello) = TxNegotiation::new(&o, [1; NONCE_LEN]);
        if let Some(at) = tamper {
            let at = hello.len() - 1 - at;
            hello[at] ^= 0x01;
        }
        let mut rx = RxNegotiation::new(t, RECEIVER, [2; NONCE_LEN]);
        let mut step = rx.on_hello(&hello);
        if let RxStep::Challenge(c) = &step {
            let TxStep::Send(proof) = tx.on_reply(c) else {
                return Err("tx refused the challenge".into());
            };
            step = rx.on_proof(&proof);
        }
        match step {
            RxStep::Decide(h) => Ok(name_of(&h)),
            RxStep::Refuse(_, why) | RxStep::Drop(why) => Err(why),
            RxStep::Challenge(_) => Err("a second challenge".into()),
        }
    }

    #[test]
    fn a_name_travels_in_the_hello_with_a_key_and_without() {
        for key in [None, Some(key(4))] {
            let named = |n| named(n, key.clone(), None);
            assert_eq!(named(Some("tank/fs-1")), Ok(Some("tank/fs-1".into())));
            // Unnamed, nothing (not even the nonce) is read as a name.
            assert_eq!(named(None), Ok(None));
        }
    }

    #[test]
    fn a_name_changed_on_the_way_fails_the_key_and_a_bad_one_is_refused() {
        // The name's last byte, 'b' to 'c': a good name, but not the one
        // tx sent, so the proofs over the hello no longer hold (tx finds
        // out first, from rx's).
        let changed = named(Some("tank-b"), Some(key(5)), Some(0));
        assert_eq!(changed, Err("tx refused the challenge".into()));
        // Without a key a change cannot be told, but every name is checked.
        for bad in ["../etc", "-rf", "a b", "a//b", "$(reboot)", ""] {
            match named(Some(bad), None, None) {
                Err(why) => assert!(why.contains("bad stream name"), "{bad}: {why}"),
                Ok(n) => panic!("{bad:?} was not refused: {n:?}"),
            }
        }
    }
}
