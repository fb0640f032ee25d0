use anyhow::Result;
use clap::{Parser, Subcommand};
use nixos_kexec::app::{self, InputArgs};
use nixos_kexec::console;
use nixos_kexec::deploy::DeployOptions;
use nixos_kexec::machine::{devlinks, facts::Facts, pid1};
use nixos_kexec::rescue::gather::Gathered;
use nixos_kexec::rescue::run::RunOptions;

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
    Run(Box<RunOptions>),
    /// From your machine: copy the bundle to a rescue system over SSH, show the plan, run it,
    /// and follow the installer to its result with its host key pinned.
    Deploy(Box<DeployOptions>),
    /// The other end of deploy's upload: unpack the archive on stdin into DIR.
    #[command(hide = true)]
    Unpack { dir: std::path::PathBuf },
    /// The other end of deploy --bundle-url: fetch the URL on stdin into FILE, kept only when
    /// its SHA-256 is the one given.
    #[command(hide = true)]
    Fetch {
        #[arg(long, value_parser = nixos_kexec::error::typed(nixos_kexec::rescue::download::Sha256::parse))]
        sha256: nixos_kexec::rescue::download::Sha256,
        file: std::path::PathBuf,
    },
    /// In the installer (logged in over SSH): the current step, then the console log as it
    /// grows, until the run ends (or Ctrl-C).
    Status {
        /// How many earlier console lines to print first.
        #[arg(short = 'n', long, default_value_t = 20)]
        lines: usize,
    },
    /// In the installer (logged in over SSH): stay up after a failure, instead of rebooting
    /// when the way back's grace period ends.
    Stay,
    /// Diagnostics: the /dev/disk links the installer makes in place of udev.
    #[command(hide = true)]
    Devlinks {
        /// Print them (`by-id/NAME -> ../../vda`, sorted) instead of creating them.
        #[arg(long)]
        print: bool,
    },
}

/// Prints to stdout, tolerating a closed pipe (`nixos-kexec gather | head`).
fn print_stdout(text: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stdout(), "{text}");
}

fn print_json(value: &impl serde::Serialize) -> Result<()> {
    print_stdout(&serde_json::to_string_pretty(value)?);
    Ok(())
}

fn gather(facts: &Facts) -> Result<Gathered> {
    let network = nixos_kexec::network::translate::gather_network()?;
    nixos_kexec::rescue::gather::gather(facts, Some(network))
}

/// Runs one command; the exit code says how it went.
fn run(command: Command) -> i32 {
    // `run` ends with a result line, as the installer does: the last thing an operator reads
    // before the machine goes away.
    let ends_with_result = matches!(command, Command::Run(_) | Command::Deploy(_));
    let result = match command {
        Command::Plan(args) => app::Input::from_system(args.params, args.cmdline_file.as_deref())
            .and_then(|input| app::make_plan(&input))
            .and_then(|(_, plan)| print_json(&plan)),
        // The installer prints its own error as it happens (install.log on the target must
        // have it) and its result line.
        Command::Install(args) => return i32::from(app::install(args, app::NetworkMode::BringUp).is_err()),
        Command::Facts => Facts::gather().and_then(|facts| print_json(&facts)),
        Command::Gather => Facts::gather().and_then(|facts| print_json(&gather(&facts)?)),
        Command::Run(options) => Facts::gather().and_then(|facts| {
            let gathered = gather(&facts)?;
            nixos_kexec::rescue::run::run(&options, &facts, gathered)
        }),
        Command::Deploy(options) => nixos_kexec::deploy::deploy(&options),
        Command::Fetch { sha256, file } => nixos_kexec::rescue::download::fetch_from_stdin(sha256, &file),
        Command::Unpack { dir } => nixos_kexec::rescue::cpio::unpack(std::io::stdin().lock(), &dir).map(drop),
        Command::Stay => nixos_kexec::installer::way_back::ask_to_stay(std::path::Path::new(
            nixos_kexec::installer::way_back::STAY_FILE,
        )),
        Command::Status { lines } => nixos_kexec::installer::status::show(lines),
        Command::Devlinks { print: true } => {
            devlinks::print_lines().map(|lines| lines.iter().for_each(|l| print_stdout(l)))
        }
        Command::Devlinks { print: false } => devlinks::refresh().map(drop),
    };
    if let Err(error) = &result {
        app::print_error(error);
        if ends_with_result {
            app::print_result(&result);
        }
    }
    i32::from(result.is_err())
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
    if matches!(cli.command, Some(Command::Deploy(_))) {
        console::init_logging_at(log::LevelFilter::Warn);
    } else {
        console::init_logging();
    }
    let code = match cli.command {
        Some(command) => run(command),
        None => {
            console::line("nothing to do; see --help");
            2
        }
    };
    std::process::exit(code);
}
