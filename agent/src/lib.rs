//! meshid agent.

pub mod cli;
