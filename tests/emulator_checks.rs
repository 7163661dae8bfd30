//! The link emulator's queue and loss logic (the emulator itself needs root
//! and runs only under `cargo bench`).

use crate::emulator::{Link, PathSpec, Rng};
use std::time::{Duration, Instant};

#[test]
fn the_link_serialises_at_its_rate_and_drops_past_its_queue() {
    let spec = PathSpec {
        rate: 8_000_000, // one byte per microsecond
        delay: Duration::ZERO,
        loss: 0.0,
        queue: Some(3000),
    };
    let t0 = Instant::now();
    let mut link = Link { busy_until: t0 };
    assert_eq!(
        link.admit(t0, 1000, &spec),
        Some(t0 + Duration::from_micros(1000))
    );
    assert_eq!(
        link.admit(t0, 1000, &spec),
        Some(t0 + Duration::from_micros(2000))
    );
    assert_eq!(
        link.admit(t0, 1000, &spec),
        Some(t0 + Duration::from_micros(3000))
    );
    assert_eq!(link.admit(t0, 1, &spec), None, "queue full");
    let later = t0 + Duration::from_micros(10_000);
    assert_eq!(
        link.admit(later, 500, &spec),
        Some(later + Duration::from_micros(500))
    );
}

#[test]
fn loss_is_seeded_and_near_its_rate() {
    let draw = |seed| {
        let mut r = Rng(seed);
        (0..100_000).filter(|_| r.unit() < 0.01).count()
    };
    assert_eq!(draw(7), draw(7));
    assert!((800..1200).contains(&draw(7)), "{}", draw(7));
}
