//! The Troop worker agent. Not built yet: issue 3 brings engine detection,
//! the WebSocket link to the coordinator and stream forwarding.

pub use troop_schemas as schemas;
