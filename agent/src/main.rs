use clap::{Parser, Subcommand};
use nixos_kexec::{app, console, facts::Facts, pid1};
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
}

fn parse_param(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((k, v)) => Ok((k.to_string(), v.to_string())),
        None => Ok((text.to_string(), String::new())),
    }
}

fn main() {
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
        Some(Command::Facts) => {
            match Facts::gather().and_then(|f| Ok(serde_json::to_string_pretty(&f)?)) {
                Ok(json) => {
                    println!("{json}");
                    0
                }
                Err(e) => {
                    app::print_error(&e);
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
                    println!("{json}");
                    0
                }
                Err(e) => {
                    app::print_error(&e);
                    1
                }
            }
        }
        Some(Command::Install(args)) => {
            let result = app::Input::from_system(args.params, args.cmdline_file.as_deref())
                .and_then(|input| app::install(&input, false));
            if let Err(e) = &result {
                app::print_error(e);
            }
            app::print_result(&result);
            i32::from(result.is_err())
        }
    };
    std::process::exit(code);
}
