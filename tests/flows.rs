//! `rx --exec`: one receiver serving many senders at once, each stream
//! into its own run of a command, named by the sender's `--name`.

use crate::util::{assert_same, data, key_file, port_of, tx, tx_fed, Out, Proc};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// A fresh directory for one test's files.
fn scratch(what: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vm-flows-{what}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A command that writes its stream to DIR/NAME.part and renames it
/// DIR/NAME only once the whole stream is in: a file named NAME is a
/// stream its command took as whole.
fn into_files(dir: &Path) -> String {
    let d = dir.display();
    format!(
        r#"cat > "{d}/$VIAMILLIPEDE_NAME.part" && mv "{d}/$VIAMILLIPEDE_NAME.part" "{d}/$VIAMILLIPEDE_NAME""#
    )
}

fn rx_exec(command: &str, extra: &[&str]) -> (Proc, String) {
    let mut args = vec!["rx", "0", "--exec", command];
    args.extend_from_slice(extra);
    let (p, _) = Proc::spawn("rx", &args, Out::Collect);
    let port = port_of(&p).to_string();
    (p, port)
}

#[test]
fn senders_at_once_each_reach_their_own_command_by_name() {
    let dir = scratch("names");
    let (mut r, port) = rx_exec(&into_files(&dir), &[]);
    let names = ["tank-a", "tank-b", "pool_c", "d.e"];
    let sends: Vec<_> = names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let input = Arc::new(data((i + 1) * 1_500_000, 60 + i as u64));
            let t = tx(
                &["tx", "127.0.0.1", &port, "threads", "3", "--name", name],
                input,
            );
            (t, ())
        })
        .collect();
    for (mut t, _) in sends {
        let status = t.wait(Duration::from_secs(60));
        assert!(status.success(), "{status}: {}", t.stderr());
    }
    for (i, name) in names.iter().enumerate() {
        let got = std::fs::read(dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_same(&got, &data((i + 1) * 1_500_000, 60 + i as u64), name);
    }
    // Still serving; a signal while idle is a clean stop.
    r.signal("TERM");
    let status = r.wait(Duration::from_secs(20));
    assert!(status.success(), "{status}: {}", r.stderr());
    for name in names {
        r.expect_stderr(&format!("flow {name} from 127.0.0.1:"));
        r.expect_stderr(&format!("flow {name}: "));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_command_that_fails_fails_only_its_own_sender() {
    let dir = scratch("fails");
    let command = format!(
        r#"if [ "$VIAMILLIPEDE_NAME" = bad ]; then cat > /dev/null; exit 3; fi; {}"#,
        into_files(&dir)
    );
    let (_r, port) = rx_exec(&command, &[]);
    let input = Arc::new(data(2_000_000, 71));
    let mut bad = tx(
        &["tx", "127.0.0.1", &port, "threads", "2", "--name", "bad"],
        Arc::clone(&input),
    );
    let mut good = tx(
        &["tx", "127.0.0.1", &port, "threads", "2", "--name", "good"],
        Arc::clone(&input),
    );
    assert_eq!(bad.wait(Duration::from_secs(60)).code(), Some(1));
    bad.expect_stderr("exited with status 3");
    assert!(
        good.wait(Duration::from_secs(60)).success(),
        "{}",
        good.stderr()
    );
    assert_same(&std::fs::read(dir.join("good")).unwrap(), &input, "good");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_cut_stream_never_reaches_its_command_as_whole() {
    let dir = scratch("cut");
    let (mut r, port) = rx_exec(&into_files(&dir), &["--reconnect-timeout", "1"]);
    let (mut t, feed) = tx_fed(&[
        "tx",
        "127.0.0.1",
        &port,
        "threads",
        "2",
        "--foot-size",
        "64K",
        "--name",
        "cut",
    ]);
    feed.send(data(1 << 20, 81)).unwrap();
    r.wait_line("flow cut from", Duration::from_secs(20));
    // The sender dies mid-stream: its command must not see a clean end.
    t.signal("KILL");
    let _ = t.wait(Duration::from_secs(10));
    r.wait_line("flow cut failed", Duration::from_secs(30));
    r.signal("TERM");
    let status = r.wait(Duration::from_secs(30));
    assert!(status.success(), "{status}: {}", r.stderr());
    assert!(dir.join("cut.part").exists(), "the command ran");
    assert!(
        !dir.join("cut").exists(),
        "a cut stream was taken as whole: {}",
        r.stderr()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_receiver_at_its_most_flows_refuses_another_as_busy() {
    let key = key_file("flows-busy", 3);
    let key = key.to_str().unwrap();
    let (r, port) = rx_exec("cat > /dev/null", &["--max-flows", "1", "--key-file", key]);
    let args = |name| ["tx", "127.0.0.1", &port, "--key-file", key, "--name", name];
    let (mut first, feed) = tx_fed(&args("first"));
    feed.send(data(100_000, 91)).unwrap();
    r.wait_line("flow first from", Duration::from_secs(20));
    let mut second = tx(&args("second"), Arc::new(data(1000, 92)));
    assert_eq!(second.wait(Duration::from_secs(30)).code(), Some(1));
    second.expect_stderr("busy");
    second.expect_stderr("--max-flows");
    drop(feed);
    assert!(
        first.wait(Duration::from_secs(30)).success(),
        "{}",
        first.stderr()
    );
}

#[test]
fn exec_and_names_are_checked_at_once() {
    let cases: [(&[&str], &str); 5] = [
        (&["tx", "127.0.0.1", "9", "--exec", "cat"], "--exec serves"),
        (&["rx", "0", "--max-flows", "2"], "give --exec"),
        (&["--connect", "h:1", "--exec", "cat"], "--exec serves"),
        (&["tx", "127.0.0.1", "9", "--name=-rf"], "may not start"),
        (&["tx", "127.0.0.1", "9", "--name", "a b"], "not ' '"),
    ];
    for (args, needle) in cases {
        let (mut p, _) = Proc::spawn("bad", args, Out::Collect);
        assert_eq!(p.wait(Duration::from_secs(10)).code(), Some(2), "{args:?}");
        p.expect_stderr(needle);
    }
}

#[test]
fn a_stop_reaches_a_command_that_has_stopped_reading() {
    let dir = scratch("stuck");
    // Reads nothing for ten minutes: rx's writes to it block.
    let command = format!("sleep 600; {}", into_files(&dir));
    let (mut r, port) = rx_exec(&command, &[]);
    let (mut t, feed) = tx_fed(&[
        "tx",
        "127.0.0.1",
        &port,
        "threads",
        "2",
        "--foot-size",
        "64K",
        "--name",
        "stuck",
    ]);
    feed.send(data(4 << 20, 101)).unwrap();
    r.wait_line("flow stuck from", Duration::from_secs(20));
    r.signal("TERM");
    // The flow is cut: its command's group is stopped, the blocked write
    // returns, and rx exits with the signal's status.
    assert_eq!(
        r.wait(Duration::from_secs(30)).code(),
        Some(143),
        "{}",
        r.stderr()
    );
    r.expect_stderr("flow stuck failed");
    assert_eq!(
        t.wait(Duration::from_secs(30)).code(),
        Some(1),
        "{}",
        t.stderr()
    );
    t.expect_stderr("stopped by SIGTERM");
    assert!(!dir.join("stuck").exists(), "the command took a cut stream");
    let _ = std::fs::remove_dir_all(&dir);
}
