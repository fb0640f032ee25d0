//! The one way external commands are run: the whole command line is logged and goes into the
//! error together with the command's stderr.

use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Where `program` is on `PATH`, if anywhere.
pub fn find_in_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

pub fn describe(command: &Command) -> String {
    let mut words = vec![command.get_program().to_string_lossy().into_owned()];
    words.extend(command.get_args().map(|a| {
        let a = a.to_string_lossy();
        if a.contains(' ') || a.is_empty() {
            format!("'{a}'")
        } else {
            a.into_owned()
        }
    }));
    words.join(" ")
}

/// How long a command other than `nixos-install` may run before it is stopped. mkfs,
/// cryptsetup, kexec and udhcpc finish in seconds to a few minutes (mkfs.btrfs discards a large
/// SSD first); one that runs longer waits on a device that stopped answering, and an install
/// that waits forever leaves the operator with a silent machine.
pub const DEADLINE: Duration = Duration::from_secs(20 * 60);

/// How long `nixos-install` may be silent before the console says it is still running.
/// Downloads and builds can be silent for long, so it is never stopped for that.
pub const QUIET_NOTICE: Duration = Duration::from_secs(5 * 60);

/// Runs a command to completion within [`DEADLINE`]; its output is returned, and on failure put
/// into the error.
pub fn run(command: &mut Command) -> Result<String> {
    run_within(command, None, DEADLINE)
}

/// Like [`run`], with `input` on the command's stdin: the way secrets reach a command (never its
/// arguments, which /proc shows to everyone and the log keeps). Only the command line is logged.
pub fn run_with_input(command: &mut Command, input: &[u8]) -> Result<String> {
    run_within(command, Some(input), DEADLINE)
}

/// Runs `command`, feeding it `input`, and stops it (SIGKILL) if it has not ended by `deadline`.
pub fn run_within(command: &mut Command, input: Option<&[u8]>, deadline: Duration) -> Result<String> {
    use std::os::unix::process::CommandExt;
    let line = describe(command);
    log::info!("running: {line}");
    let mut child = command
        // Its own process group, so stopping it stops what it started too (whose open pipes
        // would otherwise keep us waiting).
        .process_group(0)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting `{line}`"))?;
    let stdin = child.stdin.take();
    let stdout = child.stdout.take().context("capturing stdout")?;
    let stderr = child.stderr.take().context("capturing stderr")?;
    let started = Instant::now();
    let (status, stdout, stderr) = std::thread::scope(|scope| {
        if let (Some(mut stdin), Some(input)) = (stdin, input) {
            scope.spawn(move || {
                // A command that exits early closes the pipe; its status says why, so a write
                // error here is not the interesting one.
                let _ = stdin.write_all(input);
            });
        }
        let stdout = scope.spawn(move || read_all(stdout));
        let stderr = scope.spawn(move || read_all(stderr));
        let status = wait_until(&mut child, started + deadline);
        if status.as_ref().is_ok_and(Option::is_none) {
            // Killing the group closes its pipes, so the readers above end too.
            if let Ok(pid) = i32::try_from(child.id()) {
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        let stdout = stdout.join().unwrap_or_default();
        let stderr = stderr.join().unwrap_or_default();
        (status, stdout, stderr)
    });
    let Some(status) = status.with_context(|| format!("waiting for `{line}`"))? else {
        bail!(
            "`{line}` did not finish within {} and was stopped; last output: {}",
            minutes(deadline),
            one_line(&String::from_utf8_lossy(if stderr.is_empty() {
                &stdout
            } else {
                &stderr
            }))
        );
    };
    checked(
        &line,
        std::process::Output {
            status,
            stdout,
            stderr,
        },
    )
}

fn checked(line: &str, output: std::process::Output) -> Result<String> {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let said: &str = if stderr.trim().is_empty() {
            &stdout
        } else {
            &stderr
        };
        bail!("`{line}` failed ({}): {}", output.status, one_line(said));
    }
    Ok(stdout)
}

/// A command's output as one line: the console prints whole lines, each with the agent's
/// prefix, and an error is one of them.
fn one_line(text: &str) -> String {
    let lines: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    lines.join(" | ")
}

fn read_all(mut stream: impl Read) -> Vec<u8> {
    let mut bytes = Vec::new();
    let _ = stream.read_to_end(&mut bytes);
    bytes
}

/// The child's status, or `None` when `deadline` came first.
fn wait_until(child: &mut Child, deadline: Instant) -> std::io::Result<Option<ExitStatus>> {
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        std::thread::sleep(POLL);
    }
}

const POLL: Duration = Duration::from_millis(20);

fn minutes(duration: Duration) -> String {
    match duration.as_secs() {
        s if s >= 60 && s % 60 == 0 => format!("{} min", s / 60),
        s if s >= 1 => format!("{s} s"),
        _ => format!("{} ms", duration.as_millis()),
    }
}

/// Starts a server that outlives the agent (the installer's SSH server): stdin from /dev/null,
/// stdout and stderr appended to `output` (a pipe would close with the agent and kill it), in a
/// process group of its own, so stopping a command's group never reaches it. The caller owns
/// the child; when the agent ends first, PID 1 reaps it.
pub fn spawn_service(command: &mut Command, output: &Path) -> Result<Child> {
    use std::os::unix::process::CommandExt;
    let line = describe(command);
    log::info!("running: {line}");
    let log = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(output)
        .with_context(|| format!("opening {}", output.display()))?;
    let log_too = log
        .try_clone()
        .with_context(|| format!("opening {}", output.display()))?;
    command
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_too)
        .spawn()
        .with_context(|| format!("starting `{line}`"))
}

/// Runs a long command, handing each line of its stdout and stderr to `on_line` as it comes,
/// so the console shows progress and the log keeps everything. It is never stopped; when it
/// has been silent for `quiet` (and again for every `quiet` after), `on_quiet` hears for how long.
pub fn run_streaming(
    command: &mut Command,
    on_line: &(dyn Fn(&str) + Sync),
    quiet: Duration,
    on_quiet: &(dyn Fn(Duration) + Sync),
) -> Result<()> {
    let line = describe(command);
    log::info!("running: {line}");
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting `{line}`"))?;
    let stdout = child.stdout.take().context("capturing stdout")?;
    let stderr = child.stderr.take().context("capturing stderr")?;
    let last_lines = Mutex::new(Vec::<String>::new());
    let last_output = Mutex::new(Instant::now());
    let status = std::thread::scope(|scope| {
        for stream in [Box::new(stdout) as Box<dyn Read + Send>, Box::new(stderr)] {
            let (last_lines, last_output) = (&last_lines, &last_output);
            scope.spawn(move || {
                for text in BufReader::new(stream).lines().map_while(Result::ok) {
                    on_line(&text);
                    if let Ok(mut at) = last_output.lock() {
                        *at = Instant::now();
                    }
                    if let Ok(mut lines) = last_lines.lock() {
                        lines.push(text);
                        let excess = lines.len().saturating_sub(5);
                        lines.drain(..excess);
                    }
                }
            });
        }
        let mut noticed = Instant::now();
        loop {
            match child.try_wait() {
                Ok(None) => {}
                done => return done,
            }
            let heard = last_output.lock().map(|at| *at).unwrap_or(noticed);
            let since = heard.max(noticed);
            if since.elapsed() >= quiet {
                on_quiet(heard.elapsed());
                noticed = Instant::now();
            }
            std::thread::sleep(POLL);
        }
    });
    let status = status
        .ok()
        .flatten()
        .with_context(|| format!("waiting for `{line}`"))?;
    if !status.success() {
        let tail = last_lines.lock().map(|l| l.join(" | ")).unwrap_or_default();
        bail!("`{line}` failed ({status}); last output: {tail}");
    }
    Ok(())
}

/// Which output of a followed command a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// What [`follow`] does after a line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    /// Stop the command if it has not ended within this long (the other end went away
    /// without closing the connection: a machine that is rebooting).
    StopWithin(Duration),
}

/// Runs `command` with `stdin`, handing each line of its stdout and stderr to `on_line` as it
/// comes. Returns its exit status, or `None` when `on_line` asked to stop it and it was.
pub fn follow(
    command: &mut Command,
    stdin: Stdio,
    on_line: &mut dyn FnMut(Stream, &str) -> Flow,
) -> Result<Option<ExitStatus>> {
    let line = describe(command);
    log::info!("running: {line}");
    let mut child = command
        .stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting `{line}`"))?;
    let (sender, lines) = std::sync::mpsc::channel();
    for (stream, output) in [
        (
            Stream::Stdout,
            child.stdout.take().map(|s| Box::new(s) as Box<dyn Read + Send>),
        ),
        (
            Stream::Stderr,
            child.stderr.take().map(|s| Box::new(s) as Box<dyn Read + Send>),
        ),
    ] {
        let output = output.context("capturing the output")?;
        let sender = sender.clone();
        std::thread::spawn(move || {
            for text in BufReader::new(output).lines().map_while(Result::ok) {
                if sender.send((stream, text)).is_err() {
                    break;
                }
            }
        });
    }
    drop(sender);
    let mut stop_at: Option<Instant> = None;
    loop {
        match lines.recv_timeout(POLL * 10) {
            Ok((stream, text)) => {
                if let Flow::StopWithin(within) = on_line(stream, &text) {
                    let at = Instant::now() + within;
                    stop_at = Some(stop_at.map_or(at, |earlier| earlier.min(at)));
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            // Both outputs closed: the command has ended, or is about to.
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
        }
        if stop_at.is_some_and(|at| Instant::now() >= at) {
            break;
        }
    }
    let deadline = stop_at.unwrap_or_else(Instant::now) + POLL * 50;
    match wait_until(&mut child, deadline).with_context(|| format!("waiting for `{line}`"))? {
        Some(status) => Ok(Some(status)),
        None => {
            let _ = child.kill();
            let _ = child.wait();
            Ok(None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_names_the_command_and_stderr() {
        let err = run(Command::new("sh").args(["-c", "echo oops >&2; exit 3"])).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("sh -c 'echo oops >&2; exit 3'"), "{text}");
        assert!(text.contains("oops"), "{text}");
    }

    #[test]
    fn streaming_sees_every_line() {
        let seen = std::sync::Mutex::new(Vec::new());
        run_streaming(
            Command::new("sh").args(["-c", "echo a; echo b >&2"]),
            &|l| seen.lock().unwrap().push(l.to_string()),
            QUIET_NOTICE,
            &|_| panic!("not quiet"),
        )
        .unwrap();
        let mut seen = seen.into_inner().unwrap();
        seen.sort();
        assert_eq!(seen, ["a", "b"]);
        assert!(run_streaming(Command::new("false").arg("x"), &|_| {}, QUIET_NOTICE, &|_| {}).is_err());
    }

    #[test]
    fn input_goes_to_stdin_not_the_error() {
        let out = run_with_input(Command::new("sh").args(["-c", "cat"]), b"secret").unwrap();
        assert_eq!(out, "secret");
        let err = run_with_input(Command::new("sh").args(["-c", "exit 2"]), b"secret").unwrap_err();
        assert!(!format!("{err:#}").contains("secret"), "{err:#}");
    }

    #[test]
    fn a_command_past_its_deadline_is_stopped_and_named() {
        let started = Instant::now();
        let err = run_within(
            // The grandchild holds the pipes open too: it must be stopped with its parent.
            Command::new("sh").args(["-c", "echo stuck >&2; sleep 30; true"]),
            None,
            Duration::from_millis(300),
        )
        .unwrap_err();
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{:?}",
            started.elapsed()
        );
        let text = err.to_string();
        assert!(
            text.contains("did not finish within 300 ms and was stopped"),
            "{text}"
        );
        assert!(text.contains("sleep 30") && text.contains("stuck"), "{text}");
    }

    #[test]
    fn a_quick_command_is_not_held_by_the_deadline() {
        let started = Instant::now();
        assert_eq!(
            run_within(Command::new("echo").arg("hi"), None, DEADLINE).unwrap(),
            "hi\n"
        );
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn a_silent_install_is_noticed_but_never_stopped() {
        let quiet_for = Mutex::new(Vec::new());
        run_streaming(
            Command::new("sh").args(["-c", "echo start; sleep 1; echo end"]),
            &|_| {},
            Duration::from_millis(300),
            &|silent| quiet_for.lock().unwrap().push(silent),
        )
        .unwrap();
        let quiet_for = quiet_for.into_inner().unwrap();
        // About three notices in one silent second; the command still ran to its end.
        assert!((2..=4).contains(&quiet_for.len()), "{quiet_for:?}");
        assert!(
            quiet_for.iter().all(|d| *d >= Duration::from_millis(300)),
            "{quiet_for:?}"
        );
    }

    #[test]
    fn a_followed_command_is_stopped_when_asked() {
        let mut seen = Vec::new();
        let status = follow(
            Command::new("sh").args(["-c", "echo one; echo two >&2; sleep 30"]),
            Stdio::null(),
            &mut |stream, line| {
                seen.push((stream, line.to_string()));
                if line == "two" {
                    Flow::StopWithin(Duration::from_millis(100))
                } else {
                    Flow::Continue
                }
            },
        )
        .unwrap();
        assert_eq!(status, None);
        seen.sort_by_key(|(_, line)| line.clone());
        assert_eq!(
            seen,
            [
                (Stream::Stdout, "one".to_string()),
                (Stream::Stderr, "two".to_string())
            ]
        );
        let status = follow(
            Command::new("sh").args(["-c", "read x; echo got $x; exit 3"]),
            Stdio::from(std::fs::File::open("/proc/self/cmdline").unwrap()),
            &mut |_, _| Flow::Continue,
        )
        .unwrap();
        assert_eq!(status.and_then(|s| s.code()), Some(3));
    }
}
