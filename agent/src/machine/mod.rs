//! The machine the agent runs on and its kernel interfaces: facts about disks and firmware,
//! the platform, udev's device links, module loading, PID 1 duties, btrfs ioctls and the one
//! runner for external commands.

pub mod blockdev;
pub mod btrfs;
pub mod devlinks;
pub mod facts;
pub mod kmod;
pub mod pid1;
pub mod platform;
pub mod runner;
