//! nixforge's image compiler: closure → layout plan → filesystem writers →
//! partition table → container. `main.rs` is only the command line.

pub mod cli;
pub mod closure;
pub mod image;
pub mod inspect;
