pub mod harness;
pub mod scripted;
