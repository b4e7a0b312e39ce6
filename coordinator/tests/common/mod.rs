pub mod cluster;
pub mod harness;
pub mod nodes;
pub mod scripted;
pub mod services;
