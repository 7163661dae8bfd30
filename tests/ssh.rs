//! `viamillipede ssh`: both ends from one command, through a real sshd on
//! loopback (Debian's openssh-server, a throwaway host key and client key,
//! started per test and killed on drop).

use crate::util::*;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

const SSHD: &str = "/usr/sbin/sshd";

/// A throwaway sshd on 127.0.0.1 that lets root in with one key.
pub struct Sshd {
    dir: PathBuf,
    child: Child,
    port: u16,
    log: crossbeam_channel::Receiver<String>,
}

impl Sshd {
    /// Starts one, or says why not and returns None (where sshd is missing
    /// or this is not root) unless `VIAMILLIPEDE_REQUIRE_SSHD` is set, as in
    /// CI, where that is a failure.
    pub fn start() -> Option<Sshd> {
        let root = Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| o.stdout.trim_ascii() == b"0");
        if !Path::new(SSHD).exists() || !root {
            let why =
                format!("the ssh tests need {SSHD} (apt-get install openssh-server) and root");
            assert!(
                std::env::var_os("VIAMILLIPEDE_REQUIRE_SSHD").is_none(),
                "{why}"
            );
            eprintln!("skipped: {why}");
            return None;
        }
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "viamillipede-sshd-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for name in ["host_key", "client_key"] {
            let ok = Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(dir.join(name))
                .status()
                .unwrap()
                .success();
            assert!(ok, "ssh-keygen failed");
        }
        std::fs::copy(dir.join("client_key.pub"), dir.join("authorized_keys")).unwrap();
        // sshd's privilege separation directory.
        std::fs::create_dir_all("/run/sshd").unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let d = dir.display();
        let config = format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host_key\n\
             AuthorizedKeysFile {d}/authorized_keys\nPermitRootLogin prohibit-password\n\
             PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n\
             StrictModes no\nPidFile {d}/sshd.pid\nLogLevel INFO\n"
        );
        std::fs::write(dir.join("sshd_config"), config).unwrap();
        let mut child = Command::new(SSHD)
            .args(["-D", "-e", "-f"])
            .arg(dir.join("sshd_config"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Ready when it says so.
        let (ready_tx, ready) = crossbeam_channel::bounded(1);
        let (log_tx, log) = crossbeam_channel::unbounded();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if line.contains("Server listening on") {
                    let _ = ready_tx.try_send(());
                }
                let _ = log_tx.send(line);
            }
        });
        let sshd = Sshd {
            dir,
            child,
            port,
            log,
        };
        ready
            .recv_timeout(Duration::from_secs(20))
            .expect("sshd did not say it was listening");
        Some(sshd)
    }

    /// The ssh client and its options for `--ssh-command`.
    pub fn ssh_command(&self) -> String {
        format!(
            "ssh -F /dev/null -p {} -i {}/client_key -o IdentitiesOnly=yes -o BatchMode=yes \
             -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR",
            self.port,
            self.dir.display()
        )
    }

    /// Waits for a line of sshd's log containing `needle`.
    pub fn wait_log(&self, needle: &str, within: Duration) {
        let deadline = std::time::Instant::now() + within;
        loop {
            match self.log.recv_deadline(deadline) {
                Ok(line) if line.contains(needle) => return,
                Ok(_) => {}
                Err(_) => panic!("sshd logged no {needle:?} within {within:?}"),
            }
        }
    }

    /// A path in this sshd's directory, for files the far side writes.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `viamillipede ssh` with this sshd's client options and the binary under
/// test on the far side, then `words`.
fn ssh_args(sshd: &Sshd, words: &[&str]) -> Vec<String> {
    let mut args = vec![
        "ssh".to_string(),
        "-e".into(),
        sshd.ssh_command(),
        "--remote-path".into(),
        bin(),
    ];
    args.extend(words.iter().map(|w| w.to_string()));
    args
}

fn run_push(sshd: &Sshd, words: &[&str], input: Vec<u8>) -> Proc {
    let args = ssh_args(sshd, words);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    tx(&args, Arc::new(input))
}

fn run_pull(sshd: &Sshd, words: &[&str]) -> Proc {
    let args = ssh_args(sshd, words);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (p, _) = Proc::spawn_with("ssh --pull", &args, Out::Collect, Stdio::null());
    p
}

#[test]
fn push_writes_every_byte_to_the_far_command() {
    let Some(sshd) = Sshd::start() else { return };
    let input = data(9 << 20, 301);
    let out = sshd.path("pushed");
    let cmd = format!("cat > {}", out.display());
    let mut p = run_push(
        &sshd,
        &["127.0.0.1", "threads", "4", "--", &cmd],
        input.clone(),
    );
    let (status, _) = p.output();
    assert!(
        status.success(),
        "ssh push failed: {status}\n{}",
        p.stderr()
    );
    assert_same(&std::fs::read(&out).unwrap(), &input, "ssh push");
}

#[test]
fn pull_writes_the_far_commands_output_here() {
    let Some(sshd) = Sshd::start() else { return };
    let input = data(5 << 20, 302);
    let file = sshd.path("source");
    std::fs::write(&file, &input).unwrap();
    let cmd = format!("cat {}", file.display());
    let mut p = run_pull(&sshd, &["--pull", "127.0.0.1", "--compress", "--", &cmd]);
    let (status, out) = p.output();
    assert!(
        status.success(),
        "ssh pull failed: {status}\n{}",
        p.stderr()
    );
    assert_same(&out, &input, "ssh pull");
}

#[test]
fn reverse_connections_in_both_directions() {
    let Some(sshd) = Sshd::start() else { return };
    let input = data(3 << 20, 303);
    let out = sshd.path("reversed");
    let cmd = format!("cat > {}", out.display());
    let mut p = run_push(
        &sshd,
        &["--reverse", "127.0.0.1", "--", &cmd],
        input.clone(),
    );
    let (status, _) = p.output();
    assert!(
        status.success(),
        "ssh --reverse failed: {status}\n{}",
        p.stderr()
    );
    assert_same(&std::fs::read(&out).unwrap(), &input, "ssh --reverse");

    let cmd = format!("cat {}", out.display());
    let mut p = run_pull(&sshd, &["--pull", "--reverse", "127.0.0.1", "--", &cmd]);
    let (status, got) = p.output();
    assert!(
        status.success(),
        "ssh --pull --reverse failed: {status}\n{}",
        p.stderr()
    );
    assert_same(&got, &input, "ssh --pull --reverse");
}

#[test]
fn a_failing_far_command_fails_here_with_its_status_and_stderr() {
    let Some(sshd) = Sshd::start() else { return };
    // Reads everything, then fails, as `zfs recv` does on a bad stream.
    let mut p = run_push(
        &sshd,
        &[
            "127.0.0.1",
            "--",
            "cat > /dev/null; echo refused-by-recv >&2; exit 3",
        ],
        data(1 << 20, 304),
    );
    let (status, _) = p.output();
    assert_eq!(status.code(), Some(1), "{}", p.stderr());
    p.expect_stderr("refused-by-recv");
    p.expect_stderr("exited with status 3");

    // Stops reading early: the transfer fails, never exits 0.
    let mut p = run_push(
        &sshd,
        &["127.0.0.1", "--", "head -c 1000 > /dev/null; exit 5"],
        data(16 << 20, 305),
    );
    let (status, _) = p.output();
    assert_eq!(status.code(), Some(1), "{}", p.stderr());
    p.expect_stderr("exited with status 5 before it had read the whole stream");

    // A far command that fails part way through its output.
    let mut p = run_pull(
        &sshd,
        &[
            "--pull",
            "127.0.0.1",
            "--",
            "head -c 300000 /dev/zero; exit 4",
        ],
    );
    let (status, _) = p.output();
    assert_eq!(status.code(), Some(1), "{}", p.stderr());
    p.expect_stderr("exited with status 4");
}

#[test]
fn a_missing_far_viamillipede_is_named() {
    let Some(sshd) = Sshd::start() else { return };
    let args = [
        "ssh",
        "-e",
        &sshd.ssh_command(),
        "--remote-path",
        "/nonexistent/viamillipede",
        "127.0.0.1",
        "--",
        "cat",
    ];
    let mut p = tx(&args, Arc::new(b"x".to_vec()));
    let (status, _) = p.output();
    assert_eq!(status.code(), Some(1), "{}", p.stderr());
    p.expect_stderr("was not found on 127.0.0.1");
    p.expect_stderr("--remote-path");
}

#[test]
fn ssh_mode_refuses_ends_and_keys_of_its_own() {
    for (words, needle) in [
        (&["host", "tx", "h", "1", "--", "cat"][..], "'tx'"),
        (&["host", "--key-file", "k", "--", "cat"][..], "fresh key"),
        (&["host", "zfs", "recv"][..], "after --"),
        (&["host", "threads", "99", "--", "cat"][..], "99"),
    ] {
        let mut args = vec!["ssh"];
        args.extend_from_slice(words);
        let mut p = tx(&args, Arc::new(Vec::new()));
        let (status, _) = p.output();
        assert_eq!(status.code(), Some(2), "{words:?}: {}", p.stderr());
        p.expect_stderr(needle);
    }
}

#[test]
fn the_far_command_never_sees_a_clean_end_when_the_near_side_dies() {
    let Some(sshd) = Sshd::start() else { return };
    let (out, mark) = (sshd.path("partial"), sshd.path("finished"));
    // A subshell: were only `sh` stopped, it would see the end of its
    // input and finish as if the stream were whole.
    let cmd = format!("(cat > {} && touch {})", out.display(), mark.display());
    let args = ssh_args(
        &sshd,
        &["127.0.0.1", "threads", "2", "verbose", "1", "--", &cmd],
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (mut near, feed) = tx_fed(&args);
    near.wait_line("connected", Duration::from_secs(20));
    feed.send(data(4 << 20, 306)).unwrap();
    near.signal("KILL");
    let _ = near.wait(Duration::from_secs(5));
    sshd.wait_log("Disconnected from user root", Duration::from_secs(30));
    assert!(
        !mark.exists(),
        "the far command took a cut stream for a whole one"
    );
}

#[test]
fn a_far_side_that_dies_stops_the_near_side_at_once() {
    let Some(sshd) = Sshd::start() else { return };
    // The far viamillipede is killed outright: without watching ssh, this
    // side would wait out its five-minute reconnect timeout.
    let (feed_words, cmd) = (
        ["127.0.0.1", "threads", "2", "--"],
        "sleep 1; kill -9 $PPID",
    );
    let mut words: Vec<&str> = feed_words.to_vec();
    words.push(cmd);
    let args = ssh_args(&sshd, &words);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (mut near, feed) = tx_fed(&args);
    feed.send(data(1 << 20, 307)).unwrap();
    let status = near.wait(Duration::from_secs(30));
    assert_eq!(status.code(), Some(1), "{}", near.stderr());
    near.expect_stderr("while the transfer was running");
}
