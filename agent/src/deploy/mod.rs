//! `nixos-kexec deploy`: the operator's laptop drives the whole install over SSH, as today's
//! tools do (`nixos-anywhere --flake .#host root@ip`). It copies the agent, the bundle and the
//! operator's files to the rescue system, shows `run`'s plan there, runs it, reconnects to the
//! installer with the host key pinned (made here, so known before the kexec), follows it to
//! its result, and, asked to, waits for the installed system to answer with the same key.

pub mod follow;
pub mod ssh;
pub mod upload;

use crate::console;
use crate::error::{typed, user_error};
use crate::input::http::Url;
use crate::installer::status::RunResult;
use crate::machine::runner::{self, Flow, Stream};
use crate::rescue::download::Sha256;
use crate::rescue::run::RunOptions;
use anyhow::{bail, Context, Result};
use ssh::{command_line, Destination, PinnedHostKeys, Ssh};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use upload::{Upload, BUNDLE_FILES, REMOTE_AGENT, REMOTE_BUNDLE, REMOTE_DIR, REMOTE_FILES};

/// `nixos-kexec deploy`'s options; the doc comments are its `--help`.
#[derive(Debug, Clone, clap::Args)]
pub struct DeployOptions {
    /// The rescue system: root@HOST, or a Host of your ~/.ssh/config.
    #[arg(value_parser = typed(Destination::parse))]
    pub destination: Destination,
    /// SSH port of the rescue system (and of the installer and the installed system, which
    /// are reached the same way).
    #[arg(short = 'p', long)]
    pub port: Option<u16>,
    /// SSH private key to log in with (as ssh -i).
    #[arg(short = 'i', long)]
    pub identity: Option<PathBuf>,
    /// ssh config file instead of ~/.ssh/config (as ssh -F).
    #[arg(short = 'F', long)]
    pub ssh_config: Option<PathBuf>,
    /// ssh option for every connection (as ssh -o); repeatable.
    #[arg(short = 'o', long = "ssh-option")]
    pub ssh_options: Vec<String>,
    /// After the installer's success, wait until the installed system answers SSH with the
    /// same (pinned) host key.
    #[arg(long)]
    pub wait_for_boot: bool,
    /// Have the rescue system fetch the bundle's files from this URL (a directory holding
    /// the files of --bundle: bzImage or Image, initrd, kernel-params) instead of copying them
    /// from here; each must have the SHA-256 of the same file in --bundle.
    #[arg(long, value_parser = typed(Url::parse))]
    pub bundle_url: Option<Url>,
    /// How long to wait for the installer, or the installed system, to answer SSH.
    #[arg(long, default_value = "10m", value_parser = typed(parse_timeout))]
    pub ssh_timeout: Duration,
    #[command(flatten)]
    pub run: RunOptions,
}

fn parse_timeout(text: &str) -> Result<Duration> {
    crate::input::duration::parse(text).ok_or_else(|| {
        user_error(
            format!("--ssh-timeout {text:?} is not a duration."),
            "give seconds (600) or a number with s, m or h (90s, 10m, 1h).",
        )
    })
}

/// The stages, numbered on the console as the installer numbers its steps.
struct Stages {
    total: usize,
    number: usize,
    started: Instant,
    name: &'static str,
}

impl Stages {
    fn new(total: usize) -> Stages {
        Stages {
            total,
            number: 0,
            started: Instant::now(),
            name: "",
        }
    }

    fn begin(&mut self, name: &'static str, what: &str) {
        self.number += 1;
        self.name = name;
        self.started = Instant::now();
        console::line(&format!(
            "deploy: [{}/{}] {name}: {what}",
            self.number, self.total
        ));
    }

    fn done(&self) {
        console::line(&format!(
            "deploy: [{}/{}] {} done in {:.1}s",
            self.number,
            self.total,
            self.name,
            self.started.elapsed().as_secs_f64()
        ));
    }
}

pub fn deploy(options: &DeployOptions) -> Result<()> {
    refuse_what_cannot_work(options)?;
    let ssh = Ssh {
        destination: options.destination.clone(),
        port: options.port,
        identity: options.identity.clone(),
        config_file: options.ssh_config.clone(),
        options: options.ssh_options.clone(),
    };
    let agent = agent_for(&options.run.bundle)?;
    let bundle = bundle_files(&options.run.bundle)?;
    let source = match &options.bundle_url {
        None => BundleSource::Copied,
        Some(url) => BundleSource::Fetched {
            url,
            digests: bundle
                .iter()
                .map(|(_, path)| Sha256::of_file(path))
                .collect::<Result<_>>()?,
        },
    };
    // Everything read from the laptop before anything is sent.
    let upload = upload::prepare(&options.run)?;
    for fingerprint in &upload.fingerprints {
        console::line(&format!("host key: {fingerprint}"));
    }
    let mut stages = Stages::new(match (options.run.dry_run, options.wait_for_boot) {
        (true, _) => 2,
        (false, false) => 4,
        (false, true) => 5,
    });

    let what = match &source {
        BundleSource::Copied => format!(
            "the agent, the bundle and your files to {}:{REMOTE_DIR}",
            ssh.destination
        ),
        BundleSource::Fetched { url, .. } => format!(
            "the agent and your files to {}:{REMOTE_DIR}; the rescue system fetches the bundle from {url}",
            ssh.destination
        ),
    };
    stages.begin("copy", &what);
    copy(&ssh, &agent, &bundle, &source, &upload)?;
    stages.done();

    stages.begin("plan", "nixos-kexec run --dry-run on the rescue system");
    let planned = on_rescue(&ssh, &upload.run_command(true), false);
    if !matches!(planned, Ok(RescueRun::Ended)) || options.run.dry_run {
        remove_upload(&ssh);
    }
    match planned? {
        RescueRun::Ended => stages.done(),
        RescueRun::Loaded => bail!("the dry run loaded the installer"),
    }
    if options.run.dry_run {
        console::line("deploy: dry run: nothing was changed on the rescue system (the upload is removed)");
        return Ok(());
    }

    stages.begin(
        "kexec",
        "nixos-kexec run on the rescue system, which reboots into the installer",
    );
    match on_rescue(&ssh, &upload.run_command(false), true) {
        Ok(RescueRun::Loaded) => stages.done(),
        Ok(RescueRun::Ended) => {
            remove_upload(&ssh);
            bail!("run ended without loading the installer");
        }
        Err(e) => {
            remove_upload(&ssh);
            return Err(e);
        }
    }

    let pin = PinnedHostKeys::new(&upload.host_keys)?;
    stages.begin(
        "install",
        &format!(
            "following the installer over SSH, host key pinned ({})",
            upload.fingerprints.join("; ")
        ),
    );
    let transcript = match follow::installer(&ssh, &pin, options.ssh_timeout) {
        Ok(transcript) => transcript,
        Err(lost) => {
            let how = if lost.reached {
                "the connection to the installer was lost"
            } else {
                "the installer never answered SSH with the pinned host key"
            };
            stranded(&ssh, pin);
            bail!(
                "{how} within {} s (last ssh error: {}).",
                options.ssh_timeout.as_secs(),
                lost.last_error.trim()
            );
        }
    };
    match &transcript.result {
        Some(RunResult::Success) => stages.done(),
        Some(RunResult::Failure(reason)) => {
            console::line(&format!(
                "deploy: the installer failed; its last {} lines:",
                follow::LAST_LINES
            ));
            for line in transcript.last_lines(follow::LAST_LINES) {
                console::line(&format!("deploy: | {}", follow::strip(line)));
            }
            stranded(&ssh, pin);
            bail!("the installer failed: {reason}");
        }
        None => bail!("the installer's log ended without a result"),
    }

    if options.wait_for_boot {
        stages.begin(
            "boot",
            "waiting for the installed system to answer SSH with the pinned host key",
        );
        let answer = wait_for_boot(&ssh, &pin, options.ssh_timeout)?;
        console::line(&format!("deploy: the installed system answers: {answer}"));
        stages.done();
    }
    console::line(&RunResult::Success.line());
    Ok(())
}

/// What the options cannot do, refused before anything is sent.
fn refuse_what_cannot_work(options: &DeployOptions) -> Result<()> {
    let after = options
        .run
        .params
        .iter()
        .rev()
        .find(|(key, _)| key == "after")
        .map(|(_, value)| value.as_str());
    if options.wait_for_boot && matches!(after, Some("poweroff" | "halt")) {
        return Err(user_error(
            format!(
                "--wait-for-boot with --param after={} : the installed system would never boot.",
                after.unwrap_or_default()
            ),
            "drop --wait-for-boot, or let the installer reboot (the default).",
        ));
    }
    if runner::find_in_path("ssh").is_none() {
        return Err(user_error(
            "deploy uses your OpenSSH client, and there is no ssh on PATH.",
            "install it (Debian: apt-get install openssh-client).",
        ));
    }
    Ok(())
}

/// The agent to run on the rescue system: the bundle's own (built for the bundle's
/// architecture), or this very binary.
fn agent_for(bundle: &Path) -> Result<PathBuf> {
    let own = bundle.join("nixos-kexec");
    if own.is_file() {
        return Ok(own);
    }
    std::fs::read_link("/proc/self/exe").context("finding this program's binary (/proc/self/exe)")
}

/// The bundle's files that are there, each with its name.
fn bundle_files(bundle: &Path) -> Result<Vec<(&'static str, PathBuf)>> {
    let files: Vec<_> = BUNDLE_FILES
        .iter()
        .map(|name| (*name, bundle.join(name)))
        .filter(|(_, path)| path.is_file())
        .collect();
    if !files.iter().any(|(name, _)| *name == "initrd") {
        return Err(user_error(
            format!("{} holds no installer bundle (no initrd).", bundle.display()),
            "pass --bundle DIR with the bundle's kernel and initrd (kexec-bundle/build-dev DIR, or the Nix bundle's result).",
        ));
    }
    Ok(files)
}

/// The architecture an ELF binary is for, as `uname -m` says it.
fn elf_machine(path: &Path) -> Result<&'static str> {
    use std::io::Read;
    let mut header = [0u8; 20];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut header))
        .with_context(|| format!("reading {}", path.display()))?;
    if &header[..4] != b"\x7fELF" {
        bail!("{} is not an ELF binary", path.display());
    }
    Ok(match u16::from_le_bytes([header[18], header[19]]) {
        0x3e => "x86_64",
        0xb7 => "aarch64",
        _ => "unknown",
    })
}

/// How the bundle's files reach the rescue system.
enum BundleSource<'a> {
    /// Sent over the SSH connection from this machine.
    Copied,
    /// Fetched by the rescue system from `url`, each checked against its digest here (in the
    /// order of the bundle's files).
    Fetched { url: &'a Url, digests: Vec<Sha256> },
}

/// Sends the agent, the bundle (or has the rescue system fetch it) and the archive of the
/// operator's files into [`REMOTE_DIR`] (made anew, root's only).
fn copy(
    ssh: &Ssh,
    agent: &Path,
    bundle: &[(&'static str, PathBuf)],
    source: &BundleSource,
    upload: &Upload,
) -> Result<()> {
    let script = format!(
        "set -e; umask 077; rm -rf {dir}; mkdir -p {dir}/bundle {dir}/files; cat > {agent}; chmod 700 {agent}; uname -m",
        dir = REMOTE_DIR,
        agent = REMOTE_AGENT
    );
    let machine = send(ssh, &script, agent)?;
    let machine = machine.trim();
    let ours = elf_machine(agent)?;
    let machine_matches = machine == ours || (machine == "arm64" && ours == "aarch64");
    if !machine_matches {
        remove_upload(ssh);
        return Err(user_error(
            format!("The rescue system is {machine}; the agent and bundle are for {ours}."),
            format!("pass --bundle with a bundle for {machine}."),
        ));
    }
    match source {
        BundleSource::Copied => {
            for (name, path) in bundle {
                send(ssh, &format!("cat > {REMOTE_BUNDLE}/{name}"), path)?;
            }
        }
        BundleSource::Fetched { url, digests } => {
            for ((name, _), digest) in bundle.iter().zip(digests) {
                fetch_there(ssh, &url.join_file(name), *digest, name).inspect_err(|_| remove_upload(ssh))?;
            }
        }
    }
    let archive = upload.archive.to_bytes();
    runner::run_with_input(
        &mut ssh.command(None, &command_line(&[REMOTE_AGENT, "unpack", REMOTE_FILES])),
        archive.as_bytes(),
    )
    .context("unpacking your files on the rescue system")?;
    Ok(())
}

/// Has the rescue system fetch `url` into the bundle's file `name`, checked against `digest`
/// there; prints what it says. The URL travels on stdin: a token in it stays out of process
/// lists and of the command line the runner records.
fn fetch_there(ssh: &Ssh, url: &Url, digest: Sha256, name: &str) -> Result<()> {
    use std::io::Write;
    let (stdin, mut writer) = std::io::pipe().context("making a pipe for the bundle URL")?;
    writer
        .write_all(format!("{}\n", url.unredacted()).as_bytes())
        .context("writing the bundle URL to the pipe")?;
    drop(writer);
    let mut said = Vec::new();
    let command = command_line(&[
        REMOTE_AGENT,
        "fetch",
        "--sha256",
        &digest.to_string(),
        &format!("{REMOTE_BUNDLE}/{name}"),
    ]);
    let status = runner::follow(
        &mut ssh.command(None, &command),
        Stdio::from(stdin),
        &mut |_, line| {
            let line = follow::strip(line);
            console::line(&format!("rescue: {line}"));
            said.push(line.to_string());
            Flow::Continue
        },
    )?;
    if status.is_some_and(|s| s.success()) {
        return Ok(());
    }
    let problem = said.iter().rev().find_map(|l| l.strip_prefix("error: "));
    let fix = said.iter().rev().find_map(|l| l.strip_prefix("fix: "));
    match (problem, fix) {
        (Some(problem), Some(fix)) => Err(user_error(
            format!("fetching the bundle's {name} on the rescue system: {problem}"),
            fix,
        )),
        _ => bail!(
            "fetching {url} on {} failed: {}",
            ssh.destination,
            said.last().map(String::as_str).unwrap_or("no output")
        ),
    }
}

/// Runs `script` (a POSIX shell script, whatever the login shell is) with `file` on its stdin;
/// returns its stdout.
fn send(ssh: &Ssh, script: &str, file: &Path) -> Result<String> {
    let input = std::fs::File::open(file).with_context(|| format!("opening {}", file.display()))?;
    let mut output = String::new();
    let mut errors = Vec::new();
    let status = runner::follow(
        &mut ssh.command(None, &command_line(&["sh", "-c", script])),
        Stdio::from(input),
        &mut |stream, line| {
            match stream {
                Stream::Stdout => output.push_str(&format!("{line}\n")),
                Stream::Stderr => errors.push(line.to_string()),
            }
            Flow::Continue
        },
    )?;
    if !status.is_some_and(|s| s.success()) {
        bail!(
            "copying {} to {} failed: {}",
            file.display(),
            ssh.destination,
            errors.join(" | ")
        );
    }
    Ok(output)
}

/// ssh's exit status when the connection failed or was lost (the remote command's otherwise).
const SSH_CONNECTION_LOST: i32 = 255;

enum RescueRun {
    /// `run` ended (the dry run, or a refusal, which is an error).
    Ended,
    /// `run` loaded the installer and the machine went away.
    Loaded,
}

/// Runs `run` on the rescue system, printing its lines. A run that loads the installer never
/// ends: the machine reboots under the connection, which is let go shortly after.
fn on_rescue(ssh: &Ssh, run_command: &str, loads: bool) -> Result<RescueRun> {
    let mut loaded = false;
    let mut last = Vec::new();
    let status = runner::follow(
        &mut ssh.command(None, run_command),
        Stdio::null(),
        &mut |_, line| {
            let line = follow::strip(line);
            console::line(&format!("rescue: {line}"));
            last.push(line.to_string());
            if loads && line == crate::rescue::run::LOADED {
                loaded = true;
                return Flow::StopWithin(Duration::from_secs(5));
            }
            Flow::Continue
        },
    )?;
    if loaded {
        return Ok(RescueRun::Loaded);
    }
    // The machine can reboot before run's last line crosses the link: ssh then reports the
    // connection lost (255) after run had begun, without the result line every refusal ends
    // with. Whether the installer came up, the pinned connection tells.
    let result_seen = last.iter().any(|l| RunResult::parse_line(l).is_some());
    let connection_lost = status.is_none_or(|s| s.code() == Some(SSH_CONNECTION_LOST));
    if loads && !last.is_empty() && !result_seen && connection_lost {
        console::line("deploy: the connection to the rescue system ended before run's last line; it is probably rebooting into the installer");
        return Ok(RescueRun::Loaded);
    }
    match status {
        Some(status) if status.success() => Ok(RescueRun::Ended),
        Some(status) => {
            let said = last.iter().rev().find_map(|l| match RunResult::parse_line(l) {
                Some(RunResult::Failure(reason)) => Some(reason),
                _ => None,
            });
            match said {
                Some(reason) => {
                    let (problem, fix) = reason
                        .split_once(" Fix: ")
                        .unwrap_or((reason.as_str(), "see the rescue system's lines above."));
                    Err(user_error(
                        format!("run refused on the rescue system: {problem}"),
                        fix,
                    ))
                }
                None => bail!(
                    "`{}` on {} failed ({status}): {}",
                    run_command,
                    ssh.destination,
                    last.last().map(String::as_str).unwrap_or("no output")
                ),
            }
        }
        None => bail!("`{run_command}` was stopped"),
    }
}

/// Removes the upload (it holds secrets) after a refusal; best effort, and said when it fails.
fn remove_upload(ssh: &Ssh) {
    let removed = runner::run(&mut ssh.command(None, &command_line(&["rm", "-rf", REMOTE_DIR])));
    if let Err(e) = removed {
        console::line(&format!(
            "deploy: could not remove {REMOTE_DIR} on {} ({}); it holds your secrets: remove it yourself",
            ssh.destination,
            crate::error::one_line(&e)
        ));
    }
}

/// After a failure the installer keeps SSH up: says how to reach it, keeping the pinned
/// known_hosts file for that.
fn stranded(ssh: &Ssh, pin: PinnedHostKeys) {
    let reach = runner::describe(&ssh.command(Some(&pin), "nixos-kexec status"));
    pin.keep();
    console::line(&format!(
        "deploy: the installer keeps its SSH server up (until the way back reboots it, when no disk was written); log in with: {reach}"
    ));
}

/// Waits until the installed system (not the installer: it has no status file) answers with
/// the pinned host key; returns what it says about itself.
fn wait_for_boot(ssh: &Ssh, pin: &PinnedHostKeys, patience: Duration) -> Result<String> {
    let started = Instant::now();
    let probe = format!(
        "test ! -e {} && echo \"$(uname -n), kernel $(uname -r)\"",
        crate::installer::status::STATUS_FILE
    );
    let mut last = String::new();
    while started.elapsed() < patience {
        match runner::run(&mut ssh.command(Some(pin), &probe)) {
            Ok(answer) => return Ok(answer.trim().to_string()),
            Err(e) => last = crate::error::one_line(&e),
        }
        std::thread::sleep(Duration::from_secs(5));
    }
    bail!(
        "the installed system did not answer SSH with the pinned host key within {} s (last: {last}); the install itself succeeded",
        patience.as_secs()
    )
}
