//! Phone-home (`nixos_kexec.report_url`): a report server on the host's loopback, which the
//! guest reaches as 10.0.2.2, receives the installer's events; one that answers 500 or is down
//! does not change the install. Each VM prepares the smallest layout (ext4) and stops before
//! the install step (the dev bundle has no Nix).
//!
//! cargo test -p nixos-kexec-tests --test phone_home -- --nocapture

use anyhow::{ensure, Context, Result};
use nixos_kexec_tests::tls::{free_port, TestCa, TlsFront};
use nixos_kexec_tests::*;
use serde_json::Value;
use std::path::Path;

const KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG1I/9iAkoeXOthTVOzsjMVNHr/NoG7tXzkXLJ5R4vxD operator@laptop";
const GIB: u64 = 1 << 30;
const GAVE_UP: &str = "no more events are sent";

/// The installer on a blank disk with `report_url`, preparing it and powering off.
fn prepare(bundle: &Bundle, disk: &Path, mac: &str, report_url: &str) -> Vm {
    Vm::new(bundle)
        .param("nixos_kexec.disk=/dev/vda")
        .param("nixos_kexec.hostname=phoned")
        .param(format!("nixos_kexec.ssh_key={}", KEY.replace(' ', "+")))
        .param("nixos_kexec.stop_before=install")
        .param("nixos_kexec.after=poweroff")
        .param(format!("nixos_kexec.report_url={report_url}"))
        .nic(mac)
        .disk_image(disk, DiskBus::Virtio, 512, "PHONE-TARGET")
}

/// The run succeeded, as if there were no report server, and left its report on the root
/// filesystem (partition 3), which is returned.
fn installed(out: &RunOutcome, disk: &Path) -> Result<Value> {
    out.expect_success()?;
    ensure!(out.exited_by_itself, "the VM should have powered off by itself");
    let root = extract_partition(disk, 3)?;
    e2fsck(&root)?;
    let report: Value = serde_json::from_slice(&ext4_read_file(&root, "/var/log/nixos-kexec/report.json")?)?;
    ensure!(report["result"] == "success", "report: {report}");
    Ok(report)
}

/// Over HTTPS (socat with a certificate from a CA the appended initrd adds), the server gets
/// `started`, one `step` per executed step with its duration, and `finished` with the document
/// report.json holds on the target, in that order; no body holds the host key or passphrase
/// the installer was given.
#[test]
fn the_report_server_gets_every_event_in_order_and_no_secret() -> Result<()> {
    let bundle = dev_bundle()?;
    let mac = "52:54:00:12:35:01";
    let path = format!("/report/{mac}");
    let server = ConfigServer::start(vec![(path.clone(), vec![(200, String::new())])], 50)?;
    let ca = TestCa::new()?;
    let front = TlsFront::start(&ca.server_cert("10.0.2.2", &["IP:10.0.2.2"])?, server.port())?;

    let scratch = tempfile::tempdir()?;
    let host_key = scratch.path().join("ssh_host_ed25519_key");
    ssh_keygen_new(&host_key, &["ed25519"], "root@phoned")?;
    let private_key = std::fs::read_to_string(&host_key)?;
    let passphrase = "Phone-Home-Passphrase-7f3a";
    let extra = scratch.path().join("extra.cpio");
    Cpio::new()
        .file(
            "etc/nixos-kexec/secrets/ssh_host_ed25519_key",
            0o600,
            &private_key,
        )
        .file(
            "etc/nixos-kexec/secrets/ssh_host_ed25519_key.pub",
            0o644,
            std::fs::read(host_key.with_extension("pub"))?,
        )
        .file("etc/nixos-kexec/secrets/disk-passphrase", 0o600, passphrase)
        .file("etc/nixos-kexec/ca/test-ca.pem", 0o644, ca.pem()?)
        .write_to(&extra)?;
    let disk = blank_disk(scratch.path(), "target.img", 3 * GIB)?;
    let report_url = format!("https://10.0.2.2:{}/report/${{mac}}", front.port());
    let out = prepare(&bundle, &disk, mac, &report_url)
        .name("phone_home_https")
        .extra_initrd(&extra)
        .run()?;
    let report = installed(&out, &disk)?;
    ensure!(
        out.contains(&format!(
            "report_url: sending progress events to https://10.0.2.2:{}{path}",
            front.port()
        )),
        "the substituted report URL is not shown"
    );
    ensure!(!out.contains(GAVE_UP), "the reporting gave up");

    let requests = server.recorded();
    let mut events = Vec::new();
    for request in &requests {
        ensure!(
            request.method == "POST" && request.path == path,
            "{} {}",
            request.method,
            request.path
        );
        ensure!(
            request.header("Content-Type") == Some("application/json"),
            "{:?}",
            request.headers
        );
        let body = String::from_utf8(request.body.clone())?;
        ensure!(!body.contains(passphrase), "the passphrase was sent: {body}");
        ensure!(!body.contains("PRIVATE KEY"), "a private key was sent: {body}");
        for line in private_key.lines().filter(|l| !l.starts_with("-----")) {
            ensure!(!body.contains(line), "part of the host key was sent: {body}");
        }
        events.push(serde_json::from_str::<Value>(&body).with_context(|| format!("event {body}"))?);
    }

    let started = events.first().context("no event arrived")?;
    ensure!(
        started["event"] == "started"
            && started["hostname"] == "phoned"
            && started["machine"]["mac"] == mac
            && started["version"].is_string(),
        "{started}"
    );
    let executed = report["steps"].as_array().context("report.json has no steps")?;
    ensure!(
        events.len() == executed.len() + 2,
        "{} events for {} steps: {events:?}",
        events.len(),
        executed.len()
    );
    for (index, (event, record)) in events[1..].iter().zip(executed).enumerate() {
        ensure!(
            event["event"] == "step"
                && event["step"] == record["step"]
                && event["index"] == index + 1
                && event["of"] == executed.len()
                && event["ok"] == true,
            "step event {event} for {record}"
        );
        let seconds = event["seconds"].as_f64().context("no seconds")?;
        ensure!(seconds > 0.0, "{event}");
        // The report is written during finish, so its finish record is the time until then.
        if record["step"] != "finish" {
            ensure!(event["seconds"] == record["seconds"], "{event} vs {record}");
        }
    }
    let last = events.last().context("no last event")?;
    ensure!(
        last["event"] == "finished" && last["report"] == report,
        "the last event is not report.json's document: {last}"
    );
    eprintln!(
        "phone home: {} events; result after {:.1}s",
        events.len(),
        out.time_to_result.unwrap_or_default().as_secs_f64()
    );
    Ok(())
}

/// What a report server that fails leaves: the same successful install, and one console line
/// saying the reporting stopped.
fn install_despite(out: &RunOutcome, disk: &Path, why: &str) -> Result<()> {
    installed(out, disk)?;
    let said: Vec<&str> = out.lines_containing(GAVE_UP).collect();
    ensure!(said.len() == 1, "said {} times: {said:?}", said.len());
    ensure!(
        said[0].contains("unreachable after 3 attempts (") && said[0].contains(why),
        "{}",
        said[0]
    );
    Ok(())
}

/// A report server answering 500 gets the three attempts at the first event and nothing more.
#[test]
fn a_report_server_answering_500_does_not_change_the_result() -> Result<()> {
    let bundle = dev_bundle()?;
    let mac = "52:54:00:12:35:02";
    let path = format!("/report/{mac}");
    let server = ConfigServer::start(vec![(path.clone(), vec![(500, "{}".into())])], 50)?;
    let scratch = tempfile::tempdir()?;
    let disk = blank_disk(scratch.path(), "target.img", 3 * GIB)?;
    let report_url = format!("{}/report/${{mac}}", server.guest_url());
    let out = prepare(&bundle, &disk, mac, &report_url)
        .name("phone_home_500")
        .run()?;
    install_despite(&out, &disk, "500 Internal Server Error")?;
    let requests = server.recorded();
    ensure!(requests.len() == 3, "{} requests", requests.len());
    for request in &requests {
        let event: Value = serde_json::from_slice(&request.body)?;
        ensure!(event["event"] == "started", "{event}");
    }
    Ok(())
}

/// Nothing listens at the report URL: the install goes on as if it were not there.
#[test]
fn a_report_server_that_is_down_does_not_change_the_result() -> Result<()> {
    let bundle = dev_bundle()?;
    let scratch = tempfile::tempdir()?;
    let disk = blank_disk(scratch.path(), "target.img", 3 * GIB)?;
    let report_url = format!("http://10.0.2.2:{}/report", free_port()?);
    let out = prepare(&bundle, &disk, "52:54:00:12:35:03", &report_url)
        .name("phone_home_down")
        .run()?;
    install_despite(&out, &disk, "cannot connect")
}

/// A run refused while planning (no disk named) still tells the server: `started`, then
/// `failed` with the result line's reason and no report, as nothing was executed.
#[test]
fn a_refused_run_reports_why() -> Result<()> {
    let bundle = dev_bundle()?;
    let mac = "52:54:00:12:35:04";
    let path = format!("/report/{mac}");
    let server = ConfigServer::start(vec![(path, vec![(200, String::new())])], 50)?;
    let scratch = tempfile::tempdir()?;
    let disk = used_disk(scratch.path(), "disk.img", 3 * GIB)?;
    let before = sparse_digest(&disk)?;
    let out = Vm::new(&bundle)
        .name("phone_home_refused")
        .param("nixos_kexec.after=poweroff")
        .param(format!(
            "nixos_kexec.report_url={}/report/${{mac}}",
            server.guest_url()
        ))
        .nic(mac)
        .disk_image(&disk, DiskBus::Virtio, 512, "PHONE-REFUSED")
        .grace(std::time::Duration::from_secs(3))
        .run()?;
    let reason = out.expect_failure()?;
    ensure!(sparse_digest(&disk)? == before, "the disk changed");
    let events: Vec<Value> = server
        .recorded()
        .iter()
        .map(|request| serde_json::from_slice(&request.body))
        .collect::<Result<_, _>>()?;
    ensure!(events.len() == 2, "{events:?}");
    ensure!(events[0]["event"] == "started", "{}", events[0]);
    ensure!(
        events[1]["event"] == "failed"
            && events[1]["reason"] == reason.as_str()
            && events[1].get("report").is_none(),
        "{} for the reason {reason:?}",
        events[1]
    );
    Ok(())
}
