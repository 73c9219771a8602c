//! Memory stays flat with no scraper: histogram samples are folded into
//! their buckets by the recorder's own upkeep, not kept until a scrape.
//! Counts this process's live heap bytes with a counting allocator.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator, only counting bytes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size(), Ordering::Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        unsafe { System.dealloc(p, l) }
    }
}

#[global_allocator]
static A: Counting = Counting;

/// Set in the child process that runs the measurement alone.
const ALONE: &str = "PYGMY_TEST_ALONE";

#[test]
fn histogram_samples_do_not_pile_up_without_a_scraper() {
    // The heap counted is the whole process's: measured in a child process
    // of this test binary running this test only, so no other test's
    // allocations count.
    if std::env::var_os(ALONE).is_none() {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "metrics_upkeep::histogram_samples_do_not_pile_up_without_a_scraper",
                "--exact",
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .env(ALONE, "1")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "the measurement failed:\n{text}");
        assert!(text.contains("1 passed"), "the measurement ran:\n{text}");
        return;
    }
    let handle = pygmy::metrics::handle().expect("the recorder installs");
    let h = metrics::histogram!(pygmy::metrics::HTTP_DURATION, "route" => "/lookup/{id}", "method" => "GET");
    h.record(0.001);
    // A steady load, 250 000 samples a second for 8 s (2 000 000 samples,
    // 16 MB if they were kept until a scrape); the live heap is read once a
    // second.
    const N: usize = 2_000_000;
    let start = Instant::now();
    let mut readings = Vec::new();
    for round in 0..80 {
        for i in 0..N / 80 {
            h.record((i % 1000) as f64 / 1e5);
        }
        let due = start + Duration::from_millis(100 * (round + 1));
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
        if round % 10 == 9 {
            readings.push(LIVE.load(Ordering::Relaxed));
        }
    }
    eprintln!("live heap each second (bytes): {readings:?}");
    // After the first upkeeps, the heap no longer grows with the samples.
    let settled = readings[2];
    let most = *readings[3..].iter().max().unwrap();
    assert!(
        most <= settled + (3 << 20),
        "the heap kept growing with no scraper: {readings:?}"
    );
    // Nothing was lost: the first render counts every sample.
    let page = handle.render();
    let count = page
        .lines()
        .find(|l| l.starts_with("pygmy_http_request_duration_seconds_count"))
        .unwrap_or_else(|| panic!("no count:\n{page}"));
    assert!(count.ends_with(&format!(" {}", N + 1)), "{count}");
}
