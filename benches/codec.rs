//! Micro-benchmarks of the hot paths that do not touch the network: the
//! frame header codec, a whole foot through the frame writer and reader
//! (plain and with checksums), and the reorder buffer.
//!
//! `cargo bench --bench codec`

use criterion::{black_box, criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use viamillipede::pool::Pool;
use viamillipede::protocol::Header;
use viamillipede::reorder::Reorder;
use viamillipede::wire::{FrameReader, FrameWriter};

const FOOT: u32 = 2 << 20;

fn header(c: &mut Criterion) {
    let mut g = c.benchmark_group("frame header");
    g.throughput(Throughput::Elements(1));
    let h = Header::foot(123_456_789, FOOT, false);
    g.bench_function("encode", |b| b.iter(|| black_box(&h).encode()));
    let bytes = h.encode();
    g.bench_function("decode", |b| {
        b.iter(|| Header::decode(black_box(&bytes), FOOT).unwrap())
    });
    g.finish();
}

/// One 2 MiB foot written into memory and read back, as a connection does.
fn foot(c: &mut Criterion) {
    let mut g = c.benchmark_group("foot through writer and reader");
    g.throughput(Throughput::Bytes(u64::from(FOOT)));
    let payload: Vec<u8> = (0..FOOT).map(|i| (i * 31 % 251) as u8).collect();
    let pool = Pool::new(2, FOOT as usize);
    for checksums in [false, true] {
        let name = if checksums { "with checksums" } else { "plain" };
        g.bench_function(name, |b| {
            let mut wire = Vec::with_capacity(FOOT as usize + 64);
            b.iter(|| {
                wire.clear();
                let mut w = FrameWriter::new(&mut wire, None).with_checksums(checksums);
                w.send(&Header::foot(7, FOOT, false), &payload).unwrap();
                let mut r = FrameReader::new(&wire[..], None, FOOT).with_checksums(checksums);
                let h = r.header().unwrap();
                let mut buf = pool.take();
                r.payload(&h, &mut buf).unwrap();
                black_box(buf.len())
            })
        });
    }
    g.finish();
}

/// 64 feet (a default window) arriving in a scrambled order, then written
/// in order.
fn reorder(c: &mut Criterion) {
    let mut g = c.benchmark_group("reorder buffer");
    const WINDOW: u64 = 64;
    g.throughput(Throughput::Elements(WINDOW));
    // A fixed scramble: each foot lands within the window of its place.
    let order: Vec<u64> = (0..WINDOW).map(|i| (i * 37 + 11) % WINDOW).collect();
    g.bench_function("64 feet out of order", |b| {
        b.iter_batched(
            Reorder::<Vec<u8>>::new,
            |mut r| {
                let mut written = 0;
                for &id in &order {
                    r.push(id, vec![id as u8], id == WINDOW - 1);
                    while let Some(ready) = r.pop_ready() {
                        written += ready.data.len();
                    }
                }
                black_box(written)
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

criterion_group!(benches, header, foot, reorder);
criterion_main!(benches);
