//! Everything the installer is told, read once at the edge: the kernel command line, runtime
//! info, initrd files and `config_url`, fetched over HTTP(S) when needed.

pub mod access_token;
pub mod authorized_keys;
pub mod binary_cache;
pub mod cmdline;
pub mod config;
pub mod duration;
pub mod fetch;
pub mod flake;
pub mod gitignore;
pub mod http;
pub mod report_url;
pub mod runtime_info;
pub mod tls;
pub mod tree;
