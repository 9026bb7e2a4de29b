//! meshid server: the trust domain's CA, registry, node API and admin API.

pub mod cli;
