//! From config and facts to an installed disk: the pure plan (presets and declarative storage
//! resolved into a layout), then the steps that execute it, ending in the report; after a
//! failure, the way back.

pub mod layout;
pub mod phone_home;
pub mod plan;
pub mod presets;
pub mod previous;
pub mod report;
pub mod ssh_server;
pub mod status;
pub mod steps;
pub mod storage;
pub mod templates;
pub mod way_back;
