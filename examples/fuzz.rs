//! A bounded fuzz run of every decoder that reads bytes from the network.
//!
//! `cargo run --release --example fuzz -- [INPUTS] [SEED]` (default ten
//! million inputs, seed 1). Inputs are mutations of valid messages (bit
//! flips, byte overwrites, truncation, extension, splices) and plain random
//! bytes, fed to the frame header, hello, reply, datagram and datagram
//! report decoders (and a datagram to the assembler), the blocking
//! handshake readers, both handshake machines, and the frame reader on
//! plain, sealed and authenticated streams. Checked: nothing panics;
//! whatever decodes re-encodes to the same bytes; an altered keyed stream
//! never yields altered data; no bytes that were not signed with the key
//! make tx accept, or take a refusal for a proven one. A failing input is
//! saved to `target/fuzz-failure.bin`.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Instant;
use viamillipede::crypto::Key;
use viamillipede::pool::Buffer;
use viamillipede::protocol::datagram;
use viamillipede::protocol::negotiate::{
    Offer, RxNegotiation, RxStep, Terms, TxNegotiation, TxStep,
};
use viamillipede::protocol::{Header, Hello, Kind, Reason, Reply, HEADER_LEN};
use viamillipede::udp::recv::{Arrival, Inbound};
use viamillipede::wire::{self, FrameReader, FrameWriter};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// Valid messages to start mutations from.
fn corpus(key: &Key) -> Vec<(Target, Vec<u8>)> {
    let mut out = Vec::new();
    for ext in [0usize, 32, 300] {
        let h = Hello {
            flags: if ext == 32 { 3 } else { 0 },
            checkphrase: *b"abcd",
            session: [7; 16],
            foot_size: 2 << 20,
            window: 64,
            worker: 5,
            extension: vec![0xAB; ext],
        };
        let mut b = Vec::new();
        h.encode(&mut b);
        out.push((Target::Hello, b));
    }
    for r in [
        Reply::accept(12),
        Reply::reject(Reason::Busy, "busy: another stream is in progress"),
    ] {
        let mut b = Vec::new();
        r.encode(&mut b);
        out.push((Target::Reply, b));
    }
    let mut plain = Vec::new();
    for (i, h) in [
        Header::foot(0, 5, false),
        Header::control(Kind::Ack, 0),
        Header::foot(1, 0, true),
    ]
    .iter()
    .enumerate()
    {
        let payload = vec![i as u8; h.len as usize];
        wire::write_frame(&mut plain, h, &payload).unwrap();
    }
    out.push((Target::Frames, plain));
    for (target, encrypt) in [(Target::Sealed, true), (Target::Signed, false)] {
        let (seal, _) = key.channel(b"t", b"r", true, encrypt);
        let mut w = FrameWriter::new(Vec::new(), Some(seal));
        w.send(&Header::foot(0, 40, false), &[0x5A; 40]).unwrap();
        w.send(&Header::foot(1, 3, true), b"end").unwrap();
        out.push((target, w.get_ref().clone()));
    }
    let d = datagram::Header {
        flags: datagram::FLAG_END,
        token: 9,
        counter: 3,
        piece: 2,
        piece_len: 100,
        offset: 40,
    };
    out.push((Target::Datagram, [&d.encode()[..], &[0x33; 60]].concat()));
    let r = datagram::Report {
        largest: 40,
        settled: 38,
        ack_delay_us: 900,
        rate_kib: 1200,
        lost: vec![(3, 5), (30, 38)],
    };
    out.push((Target::Report, r.encode()));
    // A keyed handshake's messages, for both machines.
    let terms = Terms {
        checkphrase: *b"abcd",
        key: Some(key.clone()),
        encrypt: false,
        checksums: false,
        udp: false,
    };
    let (mut tx, hello) = TxNegotiation::new(&offer(&terms), [1; 32]);
    let mut rx = RxNegotiation::new(terms, *b"receiver", [2; 32]);
    out.push((Target::Negotiation, hello.clone()));
    if let RxStep::Challenge(c) = rx.on_hello(&hello) {
        out.push((Target::Negotiation, c.clone()));
        let _ = tx.on_reply(&c);
    }
    out
}

fn offer(terms: &Terms) -> Offer {
    Offer {
        terms: terms.clone(),
        session: [7; 16],
        foot_size: 2 << 20,
        window: 64,
        worker: 1,
        name: None,
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Target {
    Header,
    Hello,
    Reply,
    Frames,
    Sealed,
    Signed,
    Negotiation,
    Datagram,
    Report,
}

fn mutate(rng: &mut Rng, mut b: Vec<u8>) -> Vec<u8> {
    for _ in 0..1 + rng.below(4) {
        match rng.below(6) {
            0 if !b.is_empty() => {
                let i = rng.below(b.len());
                b[i] ^= 1 << rng.below(8);
            }
            1 if !b.is_empty() => {
                let i = rng.below(b.len());
                b[i] = rng.next() as u8;
            }
            2 => b.truncate(rng.below(b.len() + 1)),
            3 => {
                let n = rng.below(64);
                b.extend(rng.bytes(n));
            }
            4 if !b.is_empty() => {
                // An interesting length field: 0, max, or just over a bound.
                let i = rng.below(b.len());
                b[i] = [0x00, 0xFF, 0x7F, 0x80, 0x01][rng.below(5)];
            }
            _ => {
                let at = rng.below(b.len() + 1);
                let n = rng.below(16);
                let junk = rng.bytes(n);
                b.splice(at..at, junk);
            }
        }
    }
    b
}

/// Reads frames as a receiver would; returns the payloads read.
fn read_frames(bytes: &[u8], keyed: Option<(&Key, bool)>) -> Vec<Vec<u8>> {
    let opener = keyed.map(|(k, encrypt)| k.channel(b"t", b"r", false, encrypt).1);
    let mut r = FrameReader::new(bytes, opener, 1024);
    let mut out = Vec::new();
    for _ in 0..8 {
        let Ok(h) = r.header() else { break };
        let mut buf = Buffer::default();
        if r.payload(&h, &mut buf).is_err() {
            break;
        }
        out.push(buf.to_vec());
    }
    out
}

fn check(target: Target, input: &[u8], original: &[u8], key: &Key, stats: &mut [u64; 2]) {
    let ok = match target {
        Target::Datagram => {
            let body = input.len().saturating_sub(datagram::HEADER_LEN);
            match datagram::Header::decode(input, body, 4096) {
                Ok(h) => {
                    assert_eq!(
                        &h.encode()[..],
                        &input[..datagram::HEADER_LEN],
                        "datagram header re-encodes differently"
                    );
                    let mut i = Inbound::new();
                    let now = Instant::now();
                    let bytes = &input[datagram::HEADER_LEN..];
                    if let Arrival::Whole(w) = i.on_datagram(&h, bytes, 0, now, |_| true) {
                        assert_eq!(
                            w.data.len(),
                            h.piece_len as usize,
                            "a whole piece of another length"
                        );
                    }
                    let _ = i.poll_report(now);
                    true
                }
                Err(_) => false,
            }
        }
        Target::Report => match datagram::Report::decode(input) {
            Ok(r) => {
                assert_eq!(r.encode(), input, "report re-encodes differently");
                true
            }
            Err(_) => false,
        },
        Target::Header => match Header::decode(input, 4096) {
            Ok(h) => {
                assert_eq!(
                    &h.encode()[..],
                    &input[..HEADER_LEN],
                    "header re-encodes differently"
                );
                true
            }
            Err(_) => false,
        },
        Target::Hello => {
            let direct = Hello::decode(input);
            let streamed = wire::read_hello(&mut &input[..]);
            if let Ok((h, n)) = &direct {
                let mut b = Vec::new();
                h.encode(&mut b);
                assert_eq!(&b[..], &input[..*n], "hello re-encodes differently");
                assert_eq!(
                    streamed.as_ref().ok(),
                    Some(h),
                    "streamed and direct decoding differ"
                );
            }
            direct.is_ok()
        }
        Target::Reply => {
            let direct = Reply::decode(input);
            let _ = wire::read_reply(&mut &input[..]);
            if let Ok((r, n)) = &direct {
                // A message that is not UTF-8 decodes lossily, on purpose.
                let raw_len = usize::from(u16::from_be_bytes([input[30], input[31]]));
                if std::str::from_utf8(&input[34..34 + raw_len]).is_ok() {
                    let mut b = Vec::new();
                    r.encode(&mut b);
                    // Reasons this version does not know decode as Other, on purpose.
                    if r.reason == Reason::Other {
                        b[11] = input[11];
                    }
                    assert_eq!(&b[..], &input[..*n], "reply re-encodes differently");
                }
            }
            direct.is_ok()
        }
        Target::Frames => !read_frames(input, None).is_empty(),
        Target::Sealed | Target::Signed => {
            let encrypt = target == Target::Sealed;
            let got = read_frames(input, Some((key, encrypt)));
            let want = read_frames(original, Some((key, encrypt)));
            // Every frame that opens is one of the originals, in order.
            assert!(
                got.len() <= want.len() && got.iter().zip(&want).all(|(a, b)| a == b),
                "an altered keyed stream opened to altered data"
            );
            !got.is_empty()
        }
        Target::Negotiation => {
            let terms = |key: Option<Key>| Terms {
                checkphrase: *b"abcd",
                key,
                encrypt: false,
                checksums: false,
                udp: false,
            };
            for k in [None, Some(key.clone())] {
                let mut rx = RxNegotiation::new(terms(k.clone()), *b"receiver", [2; 32]);
                let _ = rx.on_hello(input);
                let _ = rx.on_proof(input);
                let (mut tx, _) = TxNegotiation::new(&offer(&terms(k.clone())), [1; 32]);
                let step = tx.on_reply(input);
                if k.is_some() {
                    // Bytes nobody signed with the key never count as rx's.
                    assert!(
                        matches!(step, TxStep::Send(_) if input == original)
                            || matches!(&step, TxStep::Refused(r) if !r.proven),
                        "keyed tx took unsigned bytes: {step:?}"
                    );
                }
            }
            true
        }
    };
    stats[usize::from(!ok)] += 1;
}

fn main() {
    let mut args = std::env::args().skip(1);
    let inputs: u64 = args
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or(10_000_000);
    let seed: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(1);
    let key = Key::new(b"00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff")
        .expect("a key of 64 hex digits");
    let corpus = corpus(&key);
    let targets = [
        Target::Header,
        Target::Hello,
        Target::Reply,
        Target::Frames,
        Target::Sealed,
        Target::Signed,
        Target::Negotiation,
    ];
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut stats = [[0u64; 2]; 7];
    let start = Instant::now();
    for i in 0..inputs {
        let (target, original) = if rng.below(8) == 0 {
            // Plain random bytes, for any decoder.
            let n = rng.below(120);
            (targets[rng.below(targets.len())], rng.bytes(n))
        } else {
            let (t, b) = &corpus[rng.below(corpus.len())];
            let t = if rng.below(4) == 0 {
                Target::Header
            } else {
                *t
            };
            (t, b.clone())
        };
        let input = mutate(&mut rng, original.clone());
        let idx = targets.iter().position(|t| *t == target).unwrap();
        let run = catch_unwind(AssertUnwindSafe(|| {
            check(target, &input, &original, &key, &mut stats[idx])
        }));
        if run.is_err() {
            let path =
                std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/fuzz-failure.bin");
            let _ = std::fs::write(&path, &input);
            eprintln!("input {i} ({target:?}) failed; saved to {}", path.display());
            std::process::exit(1);
        }
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{inputs} inputs in {secs:.1} s ({:.0}/s), seed {seed}: no failures",
        inputs as f64 / secs
    );
    for (t, [ok, err]) in targets.iter().zip(stats) {
        println!("  {t:?}: {} inputs, {ok} decoded, {err} refused", ok + err);
    }
}
