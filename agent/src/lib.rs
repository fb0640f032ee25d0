//! nixos-kexec: installs NixOS from a kexec'd minimal initrd.
//!
//! Data flows one way: kernel command line and initrd files -> [`config::Config`] ->
//! [`facts::Facts`] -> [`plan::Plan`] -> [`steps`] -> report.

pub mod app;
pub mod blockdev;
pub mod btrfs;
pub mod cmdline;
pub mod config;
pub mod console;
pub mod devlinks;
pub mod error;
pub mod facts;
pub mod fetch;
pub mod http;
pub mod kmod;
pub mod layout;
pub mod machine;
pub mod network;
pub mod pid1;
pub mod plan;
pub mod presets;
pub mod rescue;
pub mod runner;
pub mod runtime_info;
pub mod steps;
pub mod storage;
pub mod templates;
pub mod tls;
