//! `viamillipede ssh HOST -- COMMAND`: both ends of a transfer from one
//! command.
//!
//! The system's ssh client (so `~/.ssh/config`, agents and host keys all
//! apply) starts `viamillipede --ssh-serve` on the far host, which runs
//! COMMAND there with a shell, as ssh itself would. A fresh random key goes
//! to it over ssh's stdin, never on a command line; the port it listens on
//! comes back over ssh's stdout. The data then takes the usual connections,
//! authenticated and encrypted with that key. The exit status is end to
//! end: 0 only when the transfer completed and COMMAND exited 0.
//!
//! ssh runs only `REMOTE_PATH --ssh-serve` through the far host's shell.
//! The lines between the two sides each start with [`TAG`]:
//! - near to far, on ssh's stdin: a [`Setup`] as JSON (the key, the far
//!   side's part, its options, COMMAND), so no shell's quoting touches
//!   them; then nothing until the near side is done, so the far side takes
//!   the end of its stdin for the near side having gone away;
//! - far to near, on ssh's stdout: `TAG ready PORT ADDR`, where PORT is
//!   where the far side listens (0 in reverse mode) and ADDR the address the
//!   ssh connection reached it at (`-` when unknown).

use crate::{fail, finish, init_logging};
use std::ffi::OsString;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, ChildStdin, Command, ExitCode, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use viamillipede::cli::{self, Parsed};
use viamillipede::config::{Config, Destination};
use viamillipede::crypto::Key;
use viamillipede::error::Error;
use viamillipede::{net, rx, tx, Summary};

/// The far side's hidden first argument.
pub const SERVE: &str = "--ssh-serve";
/// What each line between the two sides starts with: the name and the
/// version of this exchange.
const TAG: &str = "viamillipede-ssh/1";
/// How long a failed near side waits for ssh to end before killing it.
const FAR_GRACE: Duration = Duration::from_secs(10);

/// `viamillipede ssh --help`.
const HELP: &str = "\
Both ends over ssh: start viamillipede on HOST with ssh, run COMMAND there,
and move the data over many connections, encrypted with a fresh key.

Usage:
  ... | viamillipede ssh [SSH OPTIONS] HOST [OPTIONS] -- COMMAND...   (push)
  viamillipede ssh --pull [SSH OPTIONS] HOST [OPTIONS] -- COMMAND... | ...

  zfs send -R pool/fs@snap | viamillipede ssh backup -- zfs recv -F tank/fs
  viamillipede ssh --pull backup -- zfs send tank/fs@snap | zfs recv pool/fs
  tar c dir | viamillipede ssh -e 'ssh -p 2222' root@backup threads 4 -- tar x -C /srv

HOST is given to ssh as it is (user@host, a name from ~/.ssh/config). COMMAND
runs on HOST with its shell, as with ssh. ssh carries only the start: a
fresh random key (on ssh's stdin) and the port the far side listens on. The
data then goes over `threads` TCP connections from here to the address ssh
reached (or --via), authenticated and encrypted.

Exit status: 0 only when every byte was written to COMMAND (push) or here
(pull) and COMMAND exited 0; otherwise 1, with the far side's messages and
COMMAND's status on stderr.

SSH OPTIONS (anywhere before --):
  --pull              run COMMAND there and write its output here (without
                      it: send stdin here to COMMAND there)
  --reverse           the far host connects back to this one (when only it
                      can dial out): this side listens on a free port
  -e, --ssh-command CMD
                      the ssh client and its options [default: ssh], e.g.
                      'ssh -p 2222 -i ~/.ssh/backup'; split on spaces
  --remote-path CMD   how HOST's shell runs viamillipede, as it reads it:
                      ~/bin/viamillipede, 'sudo -n viamillipede'
                      [default: viamillipede]
  --via ADDR          send the data to this address of HOST (repeat for
                      ranked paths); default: the address ssh reached
  --no-encrypt        authenticate every frame but do not encrypt

OPTIONS: the transfer's (threads N, --compress, --foot-size, --window,
--rate, --progress, --stats-json FILE, verbose N, ...; see viamillipede
--help); each applies on the side it is meant for. The ends, the key and
--encrypt are set up by ssh mode itself.
";

/// Which part one side plays.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    /// Listen, and write the stream out (`rx PORT`).
    Receive,
    /// Listen, and send the stream (`tx --listen PORT`).
    Send,
    /// Connect, and write the stream out (`rx --connect`).
    ReceiveDialing,
    /// Connect, and send the stream (`tx HOST PORT`).
    SendDialing,
}

impl Role {
    /// This side's and the far side's parts.
    fn pair(pull: bool, reverse: bool) -> (Role, Role) {
        match (pull, reverse) {
            (false, false) => (Role::SendDialing, Role::Receive),
            (true, false) => (Role::ReceiveDialing, Role::Send),
            (false, true) => (Role::Send, Role::ReceiveDialing),
            (true, true) => (Role::Receive, Role::SendDialing),
        }
    }

    fn word(self) -> &'static str {
        match self {
            Role::Receive => "receive",
            Role::Send => "send",
            Role::ReceiveDialing => "receive-dialing",
            Role::SendDialing => "send-dialing",
        }
    }

    fn from_word(word: &str) -> Option<Role> {
        [
            Role::Receive,
            Role::Send,
            Role::ReceiveDialing,
            Role::SendDialing,
        ]
        .into_iter()
        .find(|r| r.word() == word)
    }

    fn listens(self) -> bool {
        matches!(self, Role::Receive | Role::Send)
    }

    fn receives(self) -> bool {
        matches!(self, Role::Receive | Role::ReceiveDialing)
    }

    /// The command-line words that give a configuration this part; the
    /// destinations are filled in once the far side's port is known.
    fn mode_words(self) -> [&'static str; 2] {
        match self {
            Role::Receive => ["--rx", "0"],
            Role::Send => ["--listen", "0"],
            Role::ReceiveDialing => ["--connect", "unknown:1"],
            Role::SendDialing => ["--tx", "unknown:1"],
        }
    }
}

/// A parsed `viamillipede ssh` command line.
#[derive(Debug, PartialEq, Eq)]
struct Invocation {
    host: String,
    pull: bool,
    reverse: bool,
    ssh: Vec<String>,
    remote_path: String,
    encrypt: bool,
    via: Vec<String>,
    /// The transfer's options, in their dashed form.
    transfer: Vec<String>,
    command: Vec<String>,
}

/// The options ssh mode sets up itself.
const OWN_ENDS: [&str; 6] = [
    "--rx",
    "--tx",
    "--listen",
    "--connect",
    "--initiate",
    "--terminate",
];
const OWN_KEY: [&str; 3] = ["--key-file", "--genkey", "--completions"];
/// Options that mean something on this side only, with whether they take
/// a value: not given to the far side.
const NEAR_ONLY: [(&str, bool); 3] = [
    ("--progress", false),
    ("--size", true),
    ("--stats-json", true),
];

fn usage(msg: impl Into<String>) -> Error {
    Error::Usage(msg.into())
}

/// Parses what follows `ssh`; `None` asks for the help text.
fn parse_invocation(args: &[String]) -> Result<Option<Invocation>, Error> {
    if args.is_empty() {
        return Err(usage(
            "give the far host and the command: viamillipede ssh HOST -- COMMAND (see viamillipede ssh --help)",
        ));
    }
    let (before, command) = match args.iter().position(|a| a == "--") {
        Some(i) => (&args[..i], &args[i + 1..]),
        None if args.iter().any(|a| a == "-h" || a == "--help") => return Ok(None),
        None => return Err(usage(
            "give the command to run on the far host after --: viamillipede ssh HOST -- COMMAND",
        )),
    };
    let mut inv = Invocation {
        host: String::new(),
        pull: false,
        reverse: false,
        ssh: vec!["ssh".into()],
        remote_path: "viamillipede".into(),
        encrypt: true,
        via: Vec::new(),
        transfer: Vec::new(),
        command: command.to_vec(),
    };
    let mut host = None;
    let mut rest = Vec::new();
    let mut words = before.iter();
    while let Some(word) = words.next() {
        let (name, inline) = match word.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n, Some(v.to_string())),
            _ => (word.as_str(), None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| words.next().cloned())
                .ok_or_else(|| usage(format!("'{name}' needs a value")))
        };
        match name {
            "-h" | "--help" => return Ok(None),
            "--pull" => inv.pull = true,
            "--reverse" => inv.reverse = true,
            "--no-encrypt" => inv.encrypt = false,
            "-e" | "--ssh-command" => {
                let v = value()?;
                inv.ssh = v.split_whitespace().map(String::from).collect();
                if inv.ssh.is_empty() {
                    return Err(usage("--ssh-command is empty"));
                }
            }
            "--remote-path" => inv.remote_path = value()?,
            "--via" => inv.via.push(value()?),
            _ if host.is_none() => {
                const OPTIONS: [&str; 6] = [
                    "--pull",
                    "--reverse",
                    "--ssh-command",
                    "--remote-path",
                    "--via",
                    "--no-encrypt",
                ];
                let near = cli::nearest(name, &OPTIONS, 0.85);
                if let (Some(option), true) = (near, word.starts_with("--")) {
                    return Err(usage(format!(
                        "unknown ssh option '{word}': did you mean '{option}'?"
                    )));
                }
                if word.starts_with('-') || cli::is_keyword(word) {
                    return Err(usage(format!(
                        "'{word}' before the host: the transfer's options go after it \
                         (viamillipede ssh [--pull] HOST [OPTIONS] -- COMMAND)"
                    )));
                }
                host = Some(word.clone());
            }
            _ => rest.push(OsString::from(word)),
        }
    }
    inv.host = host.ok_or_else(|| usage("give the far host: viamillipede ssh HOST -- COMMAND"))?;
    if inv.command.is_empty() {
        return Err(usage(format!(
            "give the command to run on {} after --",
            inv.host
        )));
    }
    let normalized = cli::normalize(std::iter::once(OsString::from("viamillipede")).chain(rest))?;
    for word in normalized.iter().skip(1) {
        let word = word.to_string_lossy();
        let name = word.split('=').next().unwrap_or_default();
        if OWN_ENDS.contains(&name) {
            return Err(usage(format!(
                "ssh mode sets up both ends itself: leave out '{}' (give other addresses of the far host with --via)",
                name.trim_start_matches('-')
            )));
        }
        if OWN_KEY.contains(&name) {
            return Err(usage(format!(
                "ssh mode makes a fresh key for every run: leave out '{name}'"
            )));
        }
        if ["--prbs", "--leglimit"].contains(&name) {
            return Err(usage(format!(
                "ssh mode carries COMMAND's data to the end: leave out '{}' (it tests a path by hand)",
                name.trim_start_matches('-')
            )));
        }
        if name != "--encrypt" {
            inv.transfer.push(word.into_owned());
        }
    }
    if inv.reverse && !inv.via.is_empty() {
        return Err(usage(
            "--via names addresses of the far host, which --reverse does not dial: give one or the other",
        ));
    }
    Ok(Some(inv))
}

/// The transfer's options for the far side: those that mean something
/// only here left out.
fn far_options(transfer: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    let mut words = transfer.iter();
    while let Some(word) = words.next() {
        let name = word.split('=').next().unwrap_or_default();
        match NEAR_ONLY.iter().find(|(n, _)| *n == name) {
            Some((_, true)) if !word.contains('=') => {
                words.next();
            }
            Some(_) => {}
            None => out.push(word.clone()),
        }
    }
    out
}

/// The command line ssh gives the far host's shell: the path as the user
/// wrote it (so `~/bin/viamillipede` and `sudo -n viamillipede` work, as
/// rsync's --rsync-path does) and one plain word. Everything else travels
/// on ssh's stdin ([`Setup`]), so no shell's quoting rules apply to it.
fn far_command(inv: &Invocation) -> String {
    format!("{} {SERVE}", inv.remote_path)
}

/// What the near side tells the far side, as one JSON line on ssh's stdin
/// after [`TAG`].
#[derive(Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Setup {
    /// The fresh key, 64 hex digits.
    key: String,
    /// The far side's part.
    role: String,
    encrypt: bool,
    /// Where the near side listens, in reverse mode (0 otherwise).
    port: u16,
    /// The transfer's options for the far side.
    options: Vec<String>,
    /// COMMAND, for the far host's shell.
    command: String,
}

impl Setup {
    fn line(&self) -> String {
        let json = serde_json::to_string(self).expect("a setup is always JSON");
        format!("{TAG} {json}\n")
    }

    fn parse(line: &str) -> Option<Setup> {
        let json = line.trim_end().strip_prefix(TAG)?.trim_start();
        serde_json::from_str(json).ok()
    }
}

/// A configuration for `role` from the transfer's options.
fn config_for(options: &[String], role: Role) -> Result<Config, Error> {
    let args = std::iter::once("viamillipede")
        .chain(options.iter().map(String::as_str))
        .chain(role.mode_words())
        .map(OsString::from);
    match cli::parse(args)? {
        Parsed::Run(config) => Ok(*config),
        Parsed::Print(_) => Err(usage(
            "--help and --version go before the host: viamillipede ssh --help",
        )),
    }
}

fn strings(args: &[OsString]) -> Result<Vec<String>, Error> {
    args.iter()
        .map(|a| {
            a.clone().into_string().map_err(|a| {
                usage(format!(
                    "'{}' is not valid text; ssh mode takes text arguments",
                    a.to_string_lossy()
                ))
            })
        })
        .collect()
}

/// `viamillipede ssh ...`: the near side.
pub fn main(args: &[OsString]) -> ExitCode {
    // The key is made for this run: a key file named in the environment is
    // neither read nor passed on. (Still one thread: nothing reads the
    // environment meanwhile.)
    std::env::remove_var("VIAMILLIPEDE_KEY_FILE");
    let inv = match strings(args).and_then(|a| parse_invocation(&a)) {
        Ok(Some(inv)) => inv,
        Ok(None) => {
            let _ = io::stdout().write_all(HELP.as_bytes());
            return ExitCode::SUCCESS;
        }
        Err(e) => return fail(&e),
    };
    let (near, far) = Role::pair(inv.pull, inv.reverse);
    let mut config = match config_for(&inv.transfer, near) {
        Ok(c) => c,
        Err(e) => return fail(&e),
    };
    // The far side parses its options on its own host: parse them here
    // first, so a mistake is told before ssh is started.
    if let Err(e) = config_for(&far_options(&inv.transfer), far) {
        return fail(&e);
    }
    init_logging(config.log_level(), "viamillipede");
    // One of the two sides sends, so every transfer option means something
    // to one of them: none is reported as ignored.
    for w in &config.warnings {
        log::warn!("{w}");
    }
    let result = crate::signals::install(&mut config)
        .and_then(|_installed| run_near(&inv, &mut config, near, far));
    finish(&config, result)
}

fn run_near(
    inv: &Invocation,
    config: &mut Config,
    near: Role,
    far: Role,
) -> Result<Summary, Error> {
    let (key, text) = Key::random()?;
    config.key = Some(key);
    config.encrypt = inv.encrypt;
    let listener = if near.listens() {
        let l = net::listen(None, 0, &config.socket)
            .map_err(|e| Error::io("listen on a free port", e))?;
        Some(l)
    } else {
        None
    };
    let near_port = match &listener {
        Some(l) => l
            .local_addr()
            .map_err(|e| Error::io("read the listening address", e))?
            .port(),
        None => 0,
    };
    let setup = Setup {
        key: text,
        role: far.word().into(),
        encrypt: inv.encrypt,
        port: near_port,
        options: far_options(&inv.transfer),
        command: inv.command.join(" "),
    };
    log::info!("starting viamillipede on {} over ssh", inv.host);
    let mut far_side = Far::start(inv, &setup)?;
    let result = match (near, listener) {
        (Role::Send, Some(l)) => {
            let config = &tx::sized(config);
            tx::send(config, tx::Connections::Accept(l), tx::input(config)?)
        }
        (Role::Receive, Some(l)) => rx::run_on(config, l),
        (role, _) => {
            let hosts = if !inv.via.is_empty() {
                inv.via.clone()
            } else if let Some(addr) = &far_side.addr {
                vec![addr.clone()]
            } else {
                let host = inv.host.rsplit_once('@').map_or(&*inv.host, |(_, h)| h);
                vec![host.to_string()]
            };
            let destinations: Vec<Destination> = hosts
                .into_iter()
                .map(|h| Destination::new(h, far_side.port))
                .collect();
            log::info!(
                "connecting to {}",
                destinations
                    .iter()
                    .map(|d| d.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            if role == Role::SendDialing {
                tx::run_to(config, &destinations)
            } else {
                rx::run_connecting(config, &destinations)
            }
        }
    };
    let status = far_side.finish(result.is_ok());
    let summary = result?;
    let status = status?;
    if status.success() {
        Ok(summary)
    } else {
        Err(Error::Remote(format!(
            "`{}` on {} {}",
            inv.command.join(" "),
            inv.host,
            describe(status)
        )))
    }
}

/// "exited with status 3", "was killed by signal 9".
fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(sig)) => format!("was killed by signal {sig}"),
        _ => format!("ended with {status}"),
    }
}

/// The ssh process that runs the far side, waited for on a thread of its
/// own: if it ends badly while the transfer here still runs (the far side
/// failed, or never dialed back), this side stops too instead of waiting
/// out its timeouts.
struct Far {
    pid: u32,
    status: crossbeam_channel::Receiver<io::Result<ExitStatus>>,
    /// Set once this side's transfer is over, so the end of ssh is then
    /// expected.
    over: Arc<AtomicBool>,
    /// Kept open while the transfer runs: its end tells the far side that
    /// this one went away.
    stdin: Option<ChildStdin>,
    port: u16,
    addr: Option<String>,
}

impl Far {
    /// Starts ssh, hands over the setup and waits for the far side to be
    /// ready (or for ssh to end, which is then the error).
    fn start(inv: &Invocation, setup: &Setup) -> Result<Far, Error> {
        let mut child = Command::new(&inv.ssh[0])
            .args(&inv.ssh[1..])
            // No terminal on the far side: it would echo the key.
            .arg("-T")
            .arg(&inv.host)
            .arg(far_command(inv))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| Error::io(format!("start `{}`", inv.ssh[0]), e))?;
        let mut stdin = child.stdin.take();
        if let Some(s) = stdin.as_mut() {
            // A failure here means ssh ended; its status says why, below.
            let _ = s
                .write_all(setup.line().as_bytes())
                .and_then(|()| s.flush());
        }
        // What the far side says, with the key taken out should a
        // misconfigured far end echo it.
        let redact =
            |line: &str| viamillipede::error::shown(&line.trim_end().replace(&setup.key, "(key)"));
        let mut lines = BufReader::new(child.stdout.take().expect("stdout is piped"));
        let mut line = String::new();
        let (port, addr) = loop {
            line.clear();
            if !matches!(lines.read_line(&mut line), Ok(n) if n > 0) {
                let status = child.wait().map_err(|e| Error::io("wait for ssh", e))?;
                return Err(not_started(inv, status));
            }
            let Some(rest) = line.trim_end().strip_prefix(TAG) else {
                log::debug!("far side: {}", redact(&line));
                continue;
            };
            let words: Vec<&str> = rest.split_whitespace().collect();
            match words.as_slice() {
                ["ready", port, addr] if port.parse::<u16>().is_ok() => {
                    break (port.parse().unwrap_or(0), addr.to_string())
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(Error::Remote(format!(
                        "the far side said something this side does not understand: {}",
                        redact(&line)
                    )));
                }
            }
        };
        // Anything else it prints goes to stderr, and ssh is never left
        // writing to a closed pipe.
        std::thread::spawn(move || {
            let _ = io::copy(&mut lines, &mut io::stderr());
        });
        let pid = child.id();
        let over = Arc::new(AtomicBool::new(false));
        let (tell, status) = crossbeam_channel::bounded(1);
        {
            let over = Arc::clone(&over);
            let host = inv.host.clone();
            std::thread::spawn(move || {
                let status = child.wait();
                if let Ok(s) = &status {
                    if !s.success() && !over.load(Ordering::SeqCst) {
                        log::error!(
                            "the far side on {host} {} while the transfer was running (its messages are above); stopping",
                            describe(*s)
                        );
                        std::process::exit(1);
                    }
                }
                let _ = tell.send(status);
            });
        }
        Ok(Far {
            pid,
            status,
            over,
            stdin,
            port,
            addr: (addr != "-").then_some(addr),
        })
    }

    /// Waits for the far side's status. After a failure here, the far side
    /// is told (its stdin ends) and given a moment before ssh is killed.
    fn finish(&mut self, ok: bool) -> Result<ExitStatus, Error> {
        self.over.store(true, Ordering::SeqCst);
        let waited = |r: Result<io::Result<ExitStatus>, _>| match r {
            Ok(status) => status.map_err(|e| Error::io("wait for ssh", e)),
            Err(_) => Err(Error::Internal("ssh's waiting thread ended".into())),
        };
        if ok {
            log::debug!("waiting for the far side to finish");
            let status = waited(self.status.recv());
            drop(self.stdin.take());
            return status;
        }
        drop(self.stdin.take());
        match self.status.recv_timeout(FAR_GRACE) {
            Ok(status) => waited(Ok(status)),
            Err(_) => {
                signal(self.pid, rustix::process::Signal::KILL, false);
                waited(self.status.recv())
            }
        }
    }
}

/// Why the far side never got ready, from ssh's exit status.
fn not_started(inv: &Invocation, status: ExitStatus) -> Error {
    let host = &inv.host;
    let path = &inv.remote_path;
    Error::Remote(match status.code() {
        Some(127) => format!(
            "'{path}' was not found on {host}: install viamillipede there, or give its path with --remote-path PATH"
        ),
        Some(126) => format!("'{path}' on {host} cannot be run (permission denied?)"),
        Some(255) => format!(
            "ssh to {host} failed, or the far side was killed (exit status 255; any message is above)"
        ),
        Some(2) => format!(
            "viamillipede on {host} refused its setup (exit status 2; its message is above): is it version {}?",
            env!("CARGO_PKG_VERSION")
        ),
        _ => format!(
            "the far side {} before it was ready (its messages are above)",
            describe(status)
        ),
    })
}

/// `viamillipede --ssh-serve`: the far side, started by ssh, which reads
/// its [`Setup`] from stdin.
pub fn serve_main(args: &[OsString]) -> ExitCode {
    std::env::remove_var("VIAMILLIPEDE_KEY_FILE");
    if !args.is_empty() {
        return fail(&usage(format!(
            "{SERVE} is started by `viamillipede ssh`, not by hand"
        )));
    }
    let mut stdin = io::stdin();
    let setup = match read_line(&mut stdin) {
        Ok(line) => Setup::parse(&line),
        Err(e) => return fail(&Error::io("read from the near side", e)),
    };
    let Some((setup, role)) = setup.and_then(|s| Role::from_word(&s.role).map(|r| (s, r))) else {
        return fail(&usage(format!(
            "the near side's setup is not what this version ({}) expects",
            env!("CARGO_PKG_VERSION")
        )));
    };
    let mut config = match config_for(&setup.options, role) {
        Ok(c) => c,
        Err(e) => return fail(&e),
    };
    init_logging(config.log_level(), "viamillipede (far side)");
    let installed = crate::signals::install(&mut config);
    match installed.and_then(|_installed| run_far(&setup, role, &mut config, stdin)) {
        Ok(code) => code,
        Err(e) => {
            log::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

/// Reads one line a byte at a time, so nothing after it is taken.
fn read_line(input: &mut impl Read) -> io::Result<String> {
    let mut line = Vec::new();
    let mut byte = [0u8];
    while line.len() < 1 << 20 {
        if input.read(&mut byte)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the near side ended before it said anything",
            ));
        }
        if byte[0] == b'\n' {
            return String::from_utf8(line).map_err(|_| io::Error::other("not text"));
        }
        line.push(byte[0]);
    }
    Err(io::Error::other("line too long"))
}

/// How long COMMAND has to stop after SIGTERM before it gets SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// Sends `sig` to COMMAND's process group (its own: COMMAND may be a
/// pipeline), or to the process alone.
fn signal(pid: u32, sig: rustix::process::Signal, group: bool) {
    if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
        let _ = match group {
            true => rustix::process::kill_process_group(pid, sig),
            false => rustix::process::kill_process(pid, sig),
        };
    }
}

/// Stops COMMAND after a failed transfer: SIGTERM to its group, then
/// SIGKILL if it has not exited within [`STOP_GRACE`]. Returns once it has.
fn stop(command: &Mutex<Option<Child>>, pid: u32) {
    signal(pid, rustix::process::Signal::TERM, true);
    let deadline = Instant::now() + STOP_GRACE;
    loop {
        let mut slot = command.lock().unwrap_or_else(|p| p.into_inner());
        let Some(child) = slot.as_mut() else { return };
        match child.try_wait() {
            Ok(Some(_)) | Err(_) => return,
            Ok(None) if Instant::now() >= deadline => {
                signal(pid, rustix::process::Signal::KILL, true);
                let _ = child.wait();
                return;
            }
            Ok(None) => {}
        }
        drop(slot);
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn run_far(
    setup: &Setup,
    role: Role,
    config: &mut Config,
    mut stdin: io::Stdin,
) -> Result<ExitCode, Error> {
    config.key =
        Some(Key::new(setup.key.as_bytes()).map_err(|e| Error::Remote(format!("key: {e}")))?);
    config.encrypt = setup.encrypt;
    // "client-address client-port server-address server-port"
    let connection = std::env::var("SSH_CONNECTION").unwrap_or_default();
    let connection: Vec<&str> = connection.split_whitespace().collect();
    let (near_addr, far_addr) = match connection.as_slice() {
        [client, _, server, _] => (Some(client.to_string()), Some(server.to_string())),
        _ => (None, None),
    };

    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg(&setup.command)
        .stderr(Stdio::inherit())
        // A group of its own, so a pipeline can be stopped whole.
        .process_group(0);
    if role.receives() {
        // COMMAND's stdout is not the stream's: it goes with its stderr.
        let stderr = io::stderr()
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| Error::io("open stderr", e))?;
        command.stdin(Stdio::piped()).stdout(Stdio::from(stderr));
    } else {
        command.stdin(Stdio::null()).stdout(Stdio::piped());
    }
    let mut child = command
        .spawn()
        .map_err(|e| Error::io(format!("run `{}`", setup.command), e))?;
    let pid = child.id();
    let input = child.stdin.take();
    let output = child.stdout.take();
    let child = Arc::new(Mutex::new(Some(child)));

    let listener = if role.listens() {
        Some(
            net::listen(None, 0, &config.socket)
                .map_err(|e| Error::io("listen on a free port", e))?,
        )
    } else {
        None
    };
    let port = match &listener {
        Some(l) => l
            .local_addr()
            .map_err(|e| Error::io("read the listening address", e))?
            .port(),
        None => 0,
    };
    {
        let mut out = io::stdout().lock();
        writeln!(
            out,
            "{TAG} ready {port} {}",
            far_addr.as_deref().unwrap_or("-")
        )
        .and_then(|()| out.flush())
        .map_err(|e| Error::io("answer the near side", e))?;
    }

    // The end of stdin before the transfer is over: the near side is gone.
    let over = Arc::new(AtomicBool::new(false));
    {
        let over = Arc::clone(&over);
        std::thread::spawn(move || {
            let _ = io::copy(&mut stdin, &mut io::sink());
            // The near side closes it after a failure it heard from this
            // side: give this side's own ending a moment to come first.
            let deadline = Instant::now() + Duration::from_secs(5);
            while !over.load(Ordering::SeqCst) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            if !over.load(Ordering::SeqCst) {
                log::error!("the near side went away (its ssh session ended): stopping");
                signal(pid, rustix::process::Signal::TERM, true);
                std::thread::sleep(STOP_GRACE.min(Duration::from_secs(2)));
                signal(pid, rustix::process::Signal::KILL, true);
                std::process::exit(1);
            }
        });
    }

    let dialed = || -> Result<Vec<Destination>, Error> {
        let host = near_addr.clone().ok_or_else(|| {
            Error::Remote("ssh did not say where it came from (no SSH_CONNECTION)".into())
        })?;
        Ok(vec![Destination::new(host, setup.port)])
    };
    let result = if role.receives() {
        let fd: OwnedFd = input.expect("stdin is piped").into();
        // Held until the outcome is known, so COMMAND never sees the end of
        // its input for a stream that failed.
        let keep = fd
            .try_clone()
            .map_err(|e| Error::io("duplicate a pipe", e))?;
        let out = File::from(fd);
        let result = match listener {
            Some(l) => rx::receive(config, l, rx::hub::Plain(out), |_| {}),
            None => dialed().and_then(|d| rx::receive_dialing(config, &d, rx::hub::Plain(out))),
        };
        over.store(true, Ordering::SeqCst);
        if result.is_err() {
            // COMMAND that stopped reading (or never ran) is the likely
            // cause: say so with its status, before stopping what is left.
            let exited = child
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = exited {
                log::error!(
                    "`{}` {} before it had read the whole stream",
                    setup.command,
                    describe(status)
                );
            }
            stop(&child, pid);
        }
        drop(keep);
        result
    } else {
        let input = CommandOutput {
            out: output.expect("stdout is piped"),
            child: Arc::clone(&child),
            command: setup.command.clone(),
        };
        let result = match listener {
            Some(l) => tx::send(config, tx::Connections::Accept(l), input),
            None => dialed().and_then(|d| tx::send(config, tx::Connections::Dial(&d), input)),
        };
        over.store(true, Ordering::SeqCst);
        if result.is_err() {
            stop(&child, pid);
        }
        result
    };
    let summary = result?;
    log::info!(
        "done: {} bytes in {:.2} s",
        summary.bytes,
        summary.elapsed.as_secs_f64()
    );
    // Sending: COMMAND was waited for at the end of its output, and exited
    // 0, or the stream would have failed. Receiving: wait for it now.
    let status = child
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
        .map(|mut c| c.wait());
    match status {
        Some(Ok(s)) if !s.success() => {
            log::error!("`{}` {}", setup.command, describe(s));
            Ok(ExitCode::from(
                s.code().map_or(1, |c| c.clamp(1, 255) as u8),
            ))
        }
        Some(Err(e)) => Err(Error::io(format!("wait for `{}`", setup.command), e)),
        _ => Ok(ExitCode::SUCCESS),
    }
}

/// COMMAND's output as the stream: its end is an error unless COMMAND
/// exited 0, so a failed `zfs send` never looks like a complete stream.
struct CommandOutput {
    out: std::process::ChildStdout,
    /// Taken (and waited for) at the end of the output.
    child: Arc<Mutex<Option<Child>>>,
    command: String,
}

impl Read for CommandOutput {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.out.read(buf)?;
        if n == 0 && !buf.is_empty() {
            let child = self.child.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some(mut child) = child {
                let status = child.wait()?;
                if !status.success() {
                    return Err(io::Error::other(format!(
                        "`{}` {}",
                        self.command,
                        describe(status)
                    )));
                }
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inv(line: &str) -> Result<Option<Invocation>, Error> {
        let args: Vec<String> = line.split_whitespace().map(String::from).collect();
        parse_invocation(&args)
    }

    fn err(line: &str) -> String {
        match inv(line) {
            Err(Error::Usage(m)) => m,
            other => panic!("expected a usage error for {line:?}, got {other:?}"),
        }
    }

    #[test]
    fn options_before_and_after_the_host() {
        let i = inv(
            "--pull -e ssh_-p_2222 root@b threads 4 --compress --via 10.0.0.2 -- zfs recv -F t/fs",
        )
        .unwrap()
        .unwrap();
        assert_eq!(i.host, "root@b");
        assert!(i.pull && !i.reverse && i.encrypt);
        assert_eq!(i.ssh, ["ssh_-p_2222"]);
        assert_eq!(i.via, ["10.0.0.2"]);
        assert_eq!(i.transfer, ["--threads", "4", "--compress"]);
        assert_eq!(i.command, ["zfs", "recv", "-F", "t/fs"]);
        assert_eq!(inv("--help").unwrap(), None);
    }

    #[test]
    fn mistakes_are_named() {
        assert!(err("host zfs recv").contains("after --"));
        assert!(err("--threads 4 host -- cat").contains("after it"));
        assert!(err("host --").contains("command"));
        assert!(err("-- cat").contains("far host"));
        assert!(err("host tx other 8834 -- cat").contains("'tx'"));
        assert!(err("host --key-file k -- cat").contains("fresh key"));
        assert!(err("host --remote-path -- cat").contains("needs a value"));
    }

    #[test]
    fn only_plain_words_go_through_the_far_shell() {
        let i = inv("--remote-path ~/bin/viamillipede h threads 4 --progress --stats-json s.json -- tar x -C '/srv/it's'")
            .unwrap()
            .unwrap();
        assert_eq!(far_command(&i), "~/bin/viamillipede --ssh-serve");
        assert_eq!(far_options(&i.transfer), ["--threads", "4"]);
    }

    #[test]
    fn the_setup_line_round_trips_whatever_the_command_holds() {
        let setup = Setup {
            key: "ab".repeat(32),
            role: Role::ReceiveDialing.word().into(),
            encrypt: false,
            port: 4242,
            options: vec!["--verbose".into(), "2".into()],
            command: "printf '%s\\n' \"a b\" $HOME `x`\nexit 3".into(),
        };
        let line = setup.line();
        assert!(line.starts_with(TAG) && line.ends_with('\n'));
        assert_eq!(line.matches('\n').count(), 1, "one line: {line}");
        assert_eq!(Setup::parse(&line), Some(setup));
        assert_eq!(Setup::parse("viamillipede-ssh/2 {}"), None);
        assert_eq!(Setup::parse(&format!("{TAG} not json")), None);
        for (pull, reverse) in [(false, false), (true, false), (false, true), (true, true)] {
            let (near, far) = Role::pair(pull, reverse);
            assert_ne!(near.listens(), far.listens());
            assert_ne!(near.receives(), far.receives());
            assert_eq!(Role::from_word(far.word()), Some(far));
        }
    }

    #[test]
    fn ssh_mode_refuses_what_would_not_reach_the_end() {
        assert!(err("h leglimit 5 -- cat").contains("leglimit"));
        assert!(err("h prbs 7 -- cat").contains("prbs"));
        assert!(err("--reverse --via 10.0.0.2 h -- cat").contains("--via"));
        assert!(err("threads 4 h -- cat").contains("after it"));
        assert!(err("--pul h -- cat").contains("did you mean '--pull'"));
    }
}
