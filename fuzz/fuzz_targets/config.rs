//! Configuration files: server, agent and sidecar TOML. Any text gives a
//! config or a typed error, never a panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = meshid_server::config::ServerConfig::parse(text);
    let _ = meshid_agent::config::AgentConfig::parse(text);
    if let Ok(cfg) = meshid_sidecar::config::Config::parse(text) {
        let _ = cfg.validate(Some("unix:///run/meshid/agent.sock".into()));
    }
});
