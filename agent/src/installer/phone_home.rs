//! Phone-home for fleets: with `report_url`, the installer POSTs one JSON [`Event`] per stage of
//! the run: `started`, a `step` as each step ends, then `finished` or `failed` with the report
//! (the document report.json holds).
//!
//! A report server must never hold up or fail an install. Each event gets a few short attempts
//! ([`options`]); the first event that cannot be delivered ends the reporting for the rest of
//! the run, said once on the console. Events go out inline, one after the other, so they arrive
//! in order, and the last one before the machine reboots or powers off.
//!
//! No secret can be in an event: the types below hold none, and the secrets the installer is
//! given ([`crate::secret::Secret`]) cannot be serialised.

use crate::console;
use crate::error::{as_user_error, one_line};
use crate::input::config::Step;
use crate::input::fetch::MachineVars;
use crate::input::http::{self, Unreachable, Url};
use crate::input::report_url::ReportUrl;
use crate::installer::report::{Report, StepRecord};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// One message to the report server, a JSON object whose `event` names it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// The input is complete and the network up; nothing is planned yet.
    Started {
        /// nixos-kexec's version.
        version: String,
        /// The host name being installed.
        hostname: String,
        /// What `${...}` in the URL stands for on this machine.
        machine: MachineVars,
    },
    /// A step ended; `index` counts from 1 up to `of`, as the console's `[i/n]` does.
    Step {
        step: Step,
        index: usize,
        of: usize,
        seconds: f64,
        ok: bool,
    },
    /// The run succeeded.
    Finished { report: Box<Report> },
    /// The run failed: why, in one line, and the report once the steps had begun.
    Failed {
        reason: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        report: Option<Box<Report>>,
    },
}

/// A few quick attempts per event: a dead server costs the run about 17 s once (three
/// attempts of at most 5 s, 0.5 s and 1 s between them), and nothing after that.
pub fn options() -> http::Options {
    http::Options {
        connect_timeout: Duration::from_secs(3),
        io_timeout: Duration::from_secs(5),
        attempt_timeout: Duration::from_secs(5),
        attempts: 3,
        first_delay: Duration::from_millis(500),
        max_delay: Duration::from_secs(2),
        ..http::Options::default()
    }
}

/// The reporter of one run.
#[derive(Debug, Default)]
pub struct PhoneHome {
    state: State,
}

#[derive(Debug, Default)]
enum State {
    /// No report_url (or a dry run, or `nixos-kexec plan`).
    #[default]
    Off,
    Sending {
        url: Url,
        options: http::Options,
    },
    /// An event could not be delivered; the console said so.
    GaveUp,
}

impl PhoneHome {
    /// Starts reporting to `report_url` as it reads on this machine, with the `started` event.
    /// A URL that cannot be made here (a variable this machine has no value for) is said once
    /// and nothing is sent.
    pub fn start(report_url: &ReportUrl, vars: &MachineVars, hostname: &str) -> PhoneHome {
        let url = match report_url.resolve(vars) {
            Ok(url) => url,
            Err(e) => {
                console::line(&format!("report_url: {}; no events are sent", problem(&e)));
                return PhoneHome { state: State::GaveUp };
            }
        };
        console::line(&format!("report_url: sending progress events to {url}"));
        let mut phone_home = PhoneHome::sending(url, options());
        phone_home.send(&Event::Started {
            version: env!("CARGO_PKG_VERSION").to_string(),
            hostname: hostname.to_string(),
            machine: vars.clone(),
        });
        phone_home
    }

    fn sending(url: Url, options: http::Options) -> PhoneHome {
        PhoneHome {
            state: State::Sending { url, options },
        }
    }

    /// The step `index` of `of` ended as `record` says.
    pub fn step(&mut self, index: usize, of: usize, record: &StepRecord) {
        self.send(&Event::Step {
            step: record.step,
            index,
            of,
            seconds: record.seconds,
            ok: record.ok,
        });
    }

    pub fn finished(&mut self, report: Report) {
        self.send(&Event::Finished {
            report: Box::new(report),
        });
    }

    pub fn failed(&mut self, reason: &str, report: Option<Report>) {
        self.send(&Event::Failed {
            reason: reason.to_string(),
            report: report.map(Box::new),
        });
    }

    /// Whether events are still being sent.
    pub fn is_sending(&self) -> bool {
        matches!(self.state, State::Sending { .. })
    }

    fn send(&mut self, event: &Event) {
        let State::Sending { url, options } = &self.state else {
            return;
        };
        let delivered = serde_json::to_vec(event)
            .map_err(anyhow::Error::from)
            .and_then(|body| {
                // The console gets the one line below; the attempts are for diagnosis.
                http::post_json(url, &body, options, &mut |line| log::debug!("report_url: {line}"))
            });
        if let Err(e) = delivered {
            console::line(&give_up_line(url, &e));
            self.state = State::GaveUp;
        }
    }
}

/// What the console says when the reporting ends early.
fn give_up_line(url: &Url, error: &anyhow::Error) -> String {
    let why = match error.downcast_ref::<Unreachable>() {
        Some(unreachable) => format!(
            "{url} unreachable after {} attempts ({})",
            unreachable.attempts, unreachable.last
        ),
        None => problem(error),
    };
    format!("report_url: {why}; no more events are sent")
}

/// The problem an error names, without its fix or a final full stop.
fn problem(error: &anyhow::Error) -> String {
    let text = match as_user_error(error) {
        Some(user) => user.problem.clone(),
        None => one_line(error),
    };
    text.trim_end_matches('.').to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::installer::report::{Outcome, Run, Summary};
    use serde_json::json;
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::TcpListener;
    use std::sync::{Arc, Mutex};
    use std::time::Instant;

    fn quick() -> http::Options {
        http::Options {
            first_delay: Duration::from_millis(10),
            max_delay: Duration::from_millis(20),
            ..options()
        }
    }

    /// A report server on 127.0.0.1 that answers every request with `status` and keeps the
    /// bodies it was sent.
    fn report_server(status: &'static str) -> (Url, Arc<Mutex<Vec<String>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = Url::parse(&format!("http://{}/report", listener.local_addr().unwrap())).unwrap();
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let kept = bodies.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                let mut reader = BufReader::new(stream);
                let mut length = 0;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    if let Some(value) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        length = value.trim().parse().unwrap();
                    }
                }
                let mut body = vec![0; length];
                reader.read_exact(&mut body).unwrap();
                kept.lock().unwrap().push(String::from_utf8(body).unwrap());
                let answer = format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n");
                let _ = reader.get_mut().write_all(answer.as_bytes());
            }
        });
        (url, bodies)
    }

    fn record(step: Step, seconds: f64, ok: bool) -> StepRecord {
        StepRecord { step, seconds, ok }
    }

    fn report(failure: Option<&str>) -> Report {
        let (_, fixture) = crate::installer::report::tests::fixtures().remove(0);
        Report {
            summary: Summary {
                result: if failure.is_some() {
                    Outcome::Failure
                } else {
                    Outcome::Success
                },
                failure: failure.map(str::to_string),
                ..fixture.summary.clone()
            },
            run: Run {
                steps: vec![record(Step::Format, 1.5, failure.is_none())],
                ..fixture.run.clone()
            },
            ..fixture
        }
    }

    #[test]
    fn events_are_json_objects_named_by_event() {
        let machine = MachineVars {
            mac: Some("52:54:00:12:34:56".into()),
            serial: None,
            uuid: Some("4c4c4544-0042-3510-8051-b4c04f4e4b32".into()),
            hostname: Some("web1".into()),
        };
        let started = Event::Started {
            version: "0.1.0".into(),
            hostname: "web1".into(),
            machine,
        };
        assert_eq!(
            serde_json::to_value(&started).unwrap(),
            json!({"event": "started", "version": "0.1.0", "hostname": "web1", "machine": {
                "mac": "52:54:00:12:34:56", "serial": null,
                "uuid": "4c4c4544-0042-3510-8051-b4c04f4e4b32", "hostname": "web1"}})
        );
        let step = Event::Step {
            step: Step::ExtraFiles,
            index: 8,
            of: 11,
            seconds: 0.25,
            ok: true,
        };
        assert_eq!(
            serde_json::to_value(&step).unwrap(),
            json!({"event": "step", "step": "extra_files", "index": 8, "of": 11, "seconds": 0.25, "ok": true})
        );
        let failed = Event::Failed {
            reason: "No target disk was chosen.".into(),
            report: None,
        };
        assert_eq!(
            serde_json::to_value(&failed).unwrap(),
            json!({"event": "failed", "reason": "No target disk was chosen."})
        );
        for event in [started, step, failed] {
            let text = serde_json::to_string(&event).unwrap();
            assert_eq!(serde_json::from_str::<Event>(&text).unwrap(), event);
        }
    }

    /// The final event carries report.json's document itself, not a summary of it.
    #[test]
    fn the_final_event_holds_the_report_as_written() {
        for failure in [
            None,
            Some("step install: nixos-install exited with exit status: 1"),
        ] {
            let report = report(failure);
            let dir = tempfile::tempdir().unwrap();
            report.write(dir.path()).unwrap();
            let written: serde_json::Value = serde_json::from_slice(
                &std::fs::read(dir.path().join(crate::installer::report::FILE_NAME)).unwrap(),
            )
            .unwrap();
            let event = match failure {
                None => Event::Finished {
                    report: Box::new(report),
                },
                Some(reason) => Event::Failed {
                    reason: reason.into(),
                    report: Some(Box::new(report)),
                },
            };
            let sent = serde_json::to_value(&event).unwrap();
            assert_eq!(sent["report"], written);
            assert_eq!(
                sent["event"],
                if failure.is_some() { "failed" } else { "finished" }
            );
        }
    }

    #[test]
    fn events_reach_the_server_in_order() {
        let (url, bodies) = report_server("204 No Content");
        let mut phone_home = PhoneHome::sending(url, quick());
        phone_home.step(1, 2, &record(Step::Wipe, 0.5, true));
        phone_home.step(2, 2, &record(Step::Finish, 0.125, true));
        phone_home.finished(report(None));
        assert!(phone_home.is_sending());
        let bodies = bodies.lock().unwrap();
        let events: Vec<Event> = bodies.iter().map(|b| serde_json::from_str(b).unwrap()).collect();
        assert_eq!(
            events,
            vec![
                Event::Step {
                    step: Step::Wipe,
                    index: 1,
                    of: 2,
                    seconds: 0.5,
                    ok: true
                },
                Event::Step {
                    step: Step::Finish,
                    index: 2,
                    of: 2,
                    seconds: 0.125,
                    ok: true
                },
                Event::Finished {
                    report: Box::new(report(None))
                },
            ]
        );
    }

    /// Nothing listens: the first event fails quickly after its attempts, the console says so
    /// once, and later events are not tried at all.
    #[test]
    fn a_dead_server_is_given_up_once_and_quickly() {
        console::init_logging();
        let closed = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = Url::parse(&format!("http://{}/gone", closed.local_addr().unwrap())).unwrap();
        drop(closed);
        let mut phone_home = PhoneHome::sending(url.clone(), quick());
        let started = Instant::now();
        phone_home.step(1, 3, &record(Step::Wipe, 0.5, true));
        assert!(!phone_home.is_sending());
        let first = started.elapsed();
        phone_home.step(2, 3, &record(Step::Partition, 0.5, true));
        phone_home.failed("step format: mkfs.ext4 failed", Some(report(Some("x"))));
        assert!(first < Duration::from_secs(2), "{first:?}");
        assert!(started.elapsed() - first < Duration::from_millis(50));
        let said: Vec<String> = console::log_text()
            .lines()
            .filter(|line| line.contains(&url.to_string()))
            .map(str::to_string)
            .collect();
        assert_eq!(said.len(), 1, "{said:?}");
        assert!(
            said[0].starts_with(&format!(
                "nixos-kexec: report_url: {url} unreachable after 3 attempts (cannot connect: "
            )) && said[0].ends_with("; no more events are sent"),
            "{said:?}"
        );
    }

    /// A server that answers 500 gets each attempt of the first event and nothing after it;
    /// one that refuses (4xx) is not asked again either.
    #[test]
    fn server_errors_end_the_reporting_after_the_attempts() {
        console::init_logging();
        let (url, bodies) = report_server("500 Internal Server Error");
        let mut phone_home = PhoneHome::sending(url, quick());
        phone_home.step(1, 2, &record(Step::Wipe, 0.5, true));
        phone_home.step(2, 2, &record(Step::Finish, 0.5, true));
        phone_home.finished(report(None));
        assert!(!phone_home.is_sending());
        assert_eq!(bodies.lock().unwrap().len(), 3);

        let (url, bodies) = report_server("403 Forbidden");
        let mut phone_home = PhoneHome::sending(url.clone(), quick());
        phone_home.failed("x", None);
        phone_home.failed("y", None);
        assert_eq!(bodies.lock().unwrap().len(), 1);
        assert!(
            console::log_text().contains(&format!(
                "report_url: {url} answered 403 Forbidden; no more events are sent\n"
            )),
            "{}",
            console::log_text()
        );
    }

    #[test]
    fn a_url_this_machine_cannot_make_sends_nothing() {
        console::init_logging();
        let url = ReportUrl::parse("http://127.0.0.1:9/report/${serial}/unmade").unwrap();
        let phone_home = PhoneHome::start(&url, &MachineVars::default(), "web1");
        assert!(!phone_home.is_sending());
        let log = console::log_text();
        let said: Vec<&str> = log.lines().filter(|l| l.contains("/unmade")).collect();
        assert_eq!(said.len(), 1, "{said:?}");
        assert!(
            said[0].contains("uses ${serial}, but the firmware reports no usable serial number")
                && said[0].ends_with("; no events are sent"),
            "{said:?}"
        );
    }
}
