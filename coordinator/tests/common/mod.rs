pub mod cluster;
pub mod harness;
pub mod scripted;
pub mod services;
