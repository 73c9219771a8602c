//! The cluster file parser and validator never panic, whatever the file holds.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pygmy::config::ClusterConfig;

fuzz_target!(|data: &[u8]| {
    // Valid UTF-8 as is (the fuzzer learns TOML faster), anything else lossily.
    let text = String::from_utf8_lossy(data);
    if let Ok(cfg) = ClusterConfig::parse(&text) {
        let _ = cfg.validate();
        // What parsed must write back out and parse again.
        let again = toml::to_string_pretty(&cfg).expect("a parsed config serialises");
        let back = ClusterConfig::parse(&again).expect("a written config parses");
        assert_eq!(back.nodes, cfg.nodes);
    }
});
