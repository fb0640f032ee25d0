//! From config and facts to an installed disk: the pure plan (presets and declarative storage
//! resolved into a layout), then the steps that execute it, ending in the report.

pub mod layout;
pub mod phone_home;
pub mod plan;
pub mod presets;
pub mod previous;
pub mod report;
pub mod steps;
pub mod storage;
pub mod templates;
