use clap::{Parser, Subcommand};
use nixos_kexec::machine::{facts::Facts, pid1};
use nixos_kexec::rescue::gather::Gathered;
use nixos_kexec::rescue::run::RunOptions;
use nixos_kexec::{app, console};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "nixos-kexec",
    version,
    about = "Install NixOS on a machine reachable only over the network"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(clap::Args)]
struct InputArgs {
    /// Installer parameter KEY=VALUE (KEY without the nixos_kexec. prefix); repeatable.
    #[arg(long = "param", value_parser = parse_param)]
    params: Vec<(String, String)>,
    /// Read kernel parameters from this file instead of /proc/cmdline.
    #[arg(long)]
    cmdline_file: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Print the install plan as JSON; changes nothing.
    Plan(InputArgs),
    /// Run the installer on this system (what /init does), without rebooting afterwards.
    Install(InputArgs),
    /// Print what the installer sees on this machine (disks, firmware, NICs) as JSON.
    Facts,
    /// Print runtime info about this (rescue) system as JSON: network, disks, keys, firmware.
    Gather,
    /// Gather, merge the options below, and kexec into the installer bundle.
    Run(RunArgs),
    /// Diagnostics: the /dev/disk links the installer makes in place of udev.
    #[command(hide = true)]
    Devlinks {
        /// Print them (`by-id/NAME -> ../../vda`, sorted) instead of creating them.
        #[arg(long)]
        print: bool,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// Directory holding the installer's bzImage and initrd.
    #[arg(long)]
    bundle: PathBuf,
    /// Target disk: /dev/disk/by-id/..., /dev/sdX, or serial:SERIAL.
    #[arg(long)]
    disk: Option<String>,
    /// Hostname of the installed system (default: this system's).
    #[arg(long)]
    hostname: Option<String>,
    /// nixpkgs flake reference for the host flake.
    #[arg(long)]
    nixpkgs: Option<String>,
    /// SSH public keys for root (default: root's authorized_keys here); repeatable.
    #[arg(long = "ssh-key-file")]
    ssh_key_files: Vec<PathBuf>,
    /// File with the disk encryption passphrase; travels only in the appended initrd archive.
    #[arg(long)]
    disk_key_file: Option<PathBuf>,
    /// Directory with pre-made ssh_host_<type>_key files to install instead of new ones.
    #[arg(long)]
    host_keys: Option<PathBuf>,
    /// Installer parameter KEY=VALUE (KEY without the nixos_kexec. prefix); repeatable.
    #[arg(long = "param", value_parser = parse_param)]
    params: Vec<(String, String)>,
    /// Print the command line, the appended archive (secrets masked) and the plan; load nothing.
    #[arg(long)]
    dry_run: bool,
}

/// Prints to stdout, tolerating a closed pipe (`nixos-kexec gather | head`).
fn print_stdout(text: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stdout(), "{text}");
}

fn gather(facts: &Facts) -> anyhow::Result<Gathered> {
    let network = nixos_kexec::network::translate::gather_network()?;
    nixos_kexec::rescue::gather::gather(facts, Some(network))
}

fn parse_param(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((k, v)) => Ok((k.to_string(), v.to_string())),
        None => Ok((text.to_string(), String::new())),
    }
}

fn main() {
    // The kernel runs /proc/sys/kernel/modprobe, which the installer points at this binary.
    let mut args = std::env::args();
    if args
        .next()
        .is_some_and(|arg0| std::path::Path::new(&arg0).file_name() == Some("modprobe".as_ref()))
    {
        std::process::exit(nixos_kexec::machine::kmod::modprobe_main(
            &args.collect::<Vec<_>>(),
        ));
    }
    if pid1::is_pid1() {
        app::init_main();
    }
    let cli = Cli::parse();
    console::init_logging();
    let code = match cli.command {
        None => {
            eprintln!("nixos-kexec: nothing to do; see --help");
            2
        }
        Some(Command::Facts) => match Facts::gather().and_then(|f| Ok(serde_json::to_string_pretty(&f)?)) {
            Ok(json) => {
                print_stdout(&json);
                0
            }
            Err(e) => {
                app::print_error(&e);
                1
            }
        },
        Some(Command::Gather) => match Facts::gather().and_then(|f| gather(&f)) {
            Ok(gathered) => match serde_json::to_string_pretty(&gathered) {
                Ok(json) => {
                    print_stdout(&json);
                    0
                }
                Err(e) => {
                    app::print_error(&e.into());
                    1
                }
            },
            Err(e) => {
                app::print_error(&e);
                1
            }
        },
        Some(Command::Devlinks { print }) => {
            let result = if print {
                nixos_kexec::machine::devlinks::print_lines()
                    .map(|lines| lines.iter().for_each(|l| print_stdout(l)))
            } else {
                nixos_kexec::machine::devlinks::refresh().map(|_| ())
            };
            match result {
                Ok(()) => 0,
                Err(e) => {
                    app::print_error(&e);
                    1
                }
            }
        }
        Some(Command::Run(args)) => {
            let options = RunOptions {
                bundle: args.bundle,
                disk: args.disk,
                hostname: args.hostname,
                nixpkgs: args.nixpkgs,
                ssh_key_files: args.ssh_key_files,
                disk_key_file: args.disk_key_file,
                host_keys: args.host_keys,
                params: args.params,
                dry_run: args.dry_run,
            };
            let result = Facts::gather().and_then(|facts| {
                let gathered = gather(&facts)?;
                nixos_kexec::rescue::run::run(&options, &facts, gathered)
            });
            match result {
                Ok(()) => 0,
                Err(e) => {
                    app::print_error(&e);
                    console::line(&format!("result: failure: {}", nixos_kexec::error::one_line(&e)));
                    1
                }
            }
        }
        Some(Command::Plan(args)) => {
            let result = app::Input::from_system(args.params, args.cmdline_file.as_deref())
                .and_then(|input| app::make_plan(&input))
                .and_then(|(_, plan)| Ok(serde_json::to_string_pretty(&plan)?));
            match result {
                Ok(json) => {
                    print_stdout(&json);
                    0
                }
                Err(e) => {
                    app::print_error(&e);
                    1
                }
            }
        }
        Some(Command::Install(args)) => {
            let result = match app::Input::from_system(args.params, args.cmdline_file.as_deref()) {
                Ok(input) => app::install(&input, false),
                Err(e) => {
                    app::print_error(&e);
                    Err(e)
                }
            };
            app::print_result(&result);
            i32::from(result.is_err())
        }
    };
    std::process::exit(code);
}
