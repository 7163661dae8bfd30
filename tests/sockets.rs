//! Socket knobs: source addresses, IPv6, buffers, Nagle, congestion control.

use crate::util::*;
use std::sync::Arc;
use std::time::Duration;

const FOOT: usize = 2 << 20;

#[test]
fn bind_pins_the_source_address_for_all_or_per_destination() {
    let (mut r, port) = rx(&["verbose", "1"]);
    let p = port.to_string();
    let input = data(3 * FOOT, 31);
    let (a, b) = (
        format!("127.0.0.1:{p}@127.0.0.4"),
        format!("127.0.0.2:{p}@127.0.0.5"),
    );
    let (mut t, feed) = tx_fed(&[
        "--tx",
        &a,
        "--tx",
        &b,
        "threads",
        "1",
        "--bind",
        "127.0.0.9",
    ]);
    feed.send(input[..FOOT].to_vec()).unwrap();
    // Each destination's connection comes from its own address.
    r.wait_lines(&["127.0.0.4", "127.0.0.5"], Duration::from_secs(10));
    feed.send(input[FOOT..].to_vec()).unwrap();
    drop(feed);
    expect_delivered(&mut t, &mut r, &input, "per-destination source");

    let (mut r, port) = rx(&["verbose", "1"]);
    let p = port.to_string();
    let input = Arc::new(data(FOOT + 1, 32));
    let mut t = tx(
        &["tx", "127.0.0.1", &p, "threads", "2", "--bind", "127.0.0.3"],
        Arc::clone(&input),
    );
    expect_delivered(&mut t, &mut r, &input, "--bind");
    r.expect_stderr("127.0.0.3");
    assert!(
        !r.stderr().contains("[::ffff:127.0.0.1]"),
        "a connection ignored --bind:\n{}",
        r.stderr()
    );
}

#[test]
fn ipv6_in_both_syntaxes() {
    for legacy in [true, false] {
        let (mut r, port) = rx(&["verbose", "1"]);
        let p = port.to_string();
        let dashed = format!("[::1]:{p}");
        let args: Vec<&str> = if legacy {
            vec!["tx", "::1", &p]
        } else {
            vec!["--tx", &dashed]
        };
        let input = Arc::new(data(FOOT + 3, 33));
        let mut t = tx(&args, Arc::clone(&input));
        expect_delivered(&mut t, &mut r, &input, "IPv6");
        r.expect_stderr("[::1]:");
    }
}

#[test]
fn buffers_nagle_and_congestion_control_can_be_set() {
    let knobs = [
        "--sndbuf",
        "256K",
        "--rcvbuf",
        "256K",
        "--nodelay",
        "false",
        "--cc",
        "reno",
    ];
    let (mut r, port) = rx(&knobs);
    let p = port.to_string();
    let input = Arc::new(data(4 * FOOT, 34));
    let mut args = vec!["tx", "127.0.0.1", p.as_str(), "threads", "2"];
    args.extend(knobs);
    let mut t = tx(&args, Arc::clone(&input));
    expect_delivered(&mut t, &mut r, &input, "socket knobs");

    let (mut bad, _) = Proc::spawn(
        "cc",
        &["rx", "0", "--cc", "no-such-algorithm"],
        Out::Collect,
    );
    assert_eq!(bad.wait(DEADLINE).code(), Some(2));
    bad.expect_stderr("--cc no-such-algorithm: the kernel refused it");
}
