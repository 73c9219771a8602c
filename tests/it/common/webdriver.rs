//! A small W3C WebDriver client for headless Chromium: starts `chromedriver`
//! on a free loopback port, opens sessions, finds and clicks elements, runs
//! JavaScript in the page, reads the browser's console log and takes
//! screenshots. The driver (and the browsers it started, in its process
//! group) are killed when the `Driver` is dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";
/// How long a condition in the page may take to hold.
pub const WAIT: Duration = Duration::from_secs(30);

/// Finds an executable on `PATH`.
fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

/// The chromedriver and chromium binaries. Without them the browser tests
/// fail (CI installs both) unless `PYGMY_SKIP_BROWSER=1` is set.
pub fn binaries() -> Option<(PathBuf, PathBuf)> {
    let driver = std::env::var_os("PYGMY_CHROMEDRIVER")
        .map(PathBuf::from)
        .or_else(|| which("chromedriver"));
    let browser = std::env::var_os("PYGMY_CHROMIUM")
        .map(PathBuf::from)
        .or_else(|| which("chromium"))
        .or_else(|| which("chromium-browser"))
        .or_else(|| which("google-chrome"));
    match (driver, browser) {
        (Some(d), Some(b)) => Some((d, b)),
        _ if std::env::var_os("PYGMY_SKIP_BROWSER").is_some() => None,
        _ => panic!(
            "the browser tests need chromium and chromedriver on PATH \
             (Debian: apt-get install chromium chromium-driver); set PYGMY_SKIP_BROWSER=1 to skip them"
        ),
    }
}

pub struct Driver {
    child: Child,
    base: String,
    browser: PathBuf,
    http: reqwest::Client,
    profiles: PathBuf,
}

impl Driver {
    pub async fn start(driver: &Path, browser: &Path, profiles: PathBuf) -> Driver {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let log = std::fs::File::create(profiles.join("chromedriver.log")).unwrap();
        use std::os::unix::process::CommandExt;
        let child = Command::new(driver)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .process_group(0)
            .spawn()
            .expect("chromedriver starts");
        pygmy::tls::default_provider();
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .no_proxy()
            .build()
            .unwrap();
        let d = Driver {
            child,
            base: format!("http://127.0.0.1:{port}"),
            browser: browser.to_path_buf(),
            http,
            profiles,
        };
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Ok(r) = d.http.get(format!("{}/status", d.base)).send().await
                && let Ok(v) = r.json::<Value>().await
                && v["value"]["ready"] == json!(true)
            {
                return d;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "chromedriver did not become ready"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A new headless browser window of `width` × `height` CSS pixels.
    pub async fn session(&self, width: u32, height: u32) -> Session {
        let profile = self
            .profiles
            .join(format!("profile-{}", uuid::Uuid::new_v4().simple()));
        let args = vec![
            "--headless=new".to_string(),
            "--no-sandbox".into(),
            "--disable-dev-shm-usage".into(),
            "--disable-gpu".into(),
            format!("--window-size={width},{height}"),
            format!("--user-data-dir={}", profile.display()),
            // Nothing but the store under test: no calls home.
            "--no-first-run".into(),
            "--no-default-browser-check".into(),
            "--disable-background-networking".into(),
            "--disable-component-update".into(),
            "--disable-sync".into(),
            "--disable-default-apps".into(),
            "--disable-extensions".into(),
            "--disable-features=Translate,OptimizationHints,MediaRouter,AutofillServerCommunication".into(),
            "--hide-scrollbars".into(),
        ];
        let mut chrome = json!({"binary": self.browser, "args": args});
        if width < 600 {
            // A desktop window cannot be this narrow: emulate a phone's screen.
            chrome["mobileEmulation"] = json!({"deviceMetrics": {"width": width, "height": height, "pixelRatio": 2.0, "touch": true}});
        }
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": chrome,
            "goog:loggingPrefs": {"browser": "ALL"},
        }}});
        let v = post(&self.http, &format!("{}/session", self.base), &caps).await;
        let id = v["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {v}"))
            .to_string();
        Session {
            http: self.http.clone(),
            url: format!("{}/session/{id}", self.base),
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        // The driver and every browser it started share its process group.
        unsafe {
            libc::kill(-(self.child.id() as i32), libc::SIGKILL);
        }
        let _ = self.child.wait();
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.profiles);
        }
    }
}

async fn post(http: &reqwest::Client, url: &str, body: &Value) -> Value {
    let res = http
        .post(url)
        .json(body)
        .send()
        .await
        .unwrap_or_else(|e| panic!("POST {url}: {e}"));
    let status = res.status();
    let v: Value = res.json().await.unwrap();
    assert!(status.is_success(), "POST {url} answered {status}: {v}");
    v["value"].clone()
}

pub struct Session {
    http: reqwest::Client,
    url: String,
}

impl Session {
    async fn cmd(&self, path: &str, body: Value) -> Value {
        post(&self.http, &format!("{}/{path}", self.url), &body).await
    }

    async fn get(&self, path: &str) -> Value {
        let v: Value = self
            .http
            .get(format!("{}/{path}", self.url))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        v["value"].clone()
    }

    pub async fn goto(&self, url: &str) {
        self.cmd("url", json!({ "url": url })).await;
    }

    pub async fn refresh(&self) {
        self.cmd("refresh", json!({})).await;
    }

    /// Runs `script` (a function body; `arguments[i]` are `args`) in the page.
    pub async fn js(&self, script: &str, args: Value) -> Value {
        self.cmd("execute/sync", json!({ "script": script, "args": args }))
            .await
    }

    /// Polls `script` until it returns something other than null/false/"".
    pub async fn wait_js(&self, what: &str, script: &str, args: Value) -> Value {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let v = self.js(script, args.clone()).await;
            if !(v.is_null() || v == json!(false) || v == json!("")) {
                return v;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting until {what}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the element `css` exists and its text contains `needle`; returns the text.
    pub async fn wait_text(&self, css: &str, needle: &str) -> String {
        let v = self
            .wait_js(
                &format!("{css} shows {needle:?}"),
                "const e = document.querySelector(arguments[0]); \
                 return e && e.textContent.includes(arguments[1]) ? e.textContent : null;",
                json!([css, needle]),
            )
            .await;
        v.as_str().unwrap().to_string()
    }

    /// The text of `css`, or None when no element matches.
    pub async fn text(&self, css: &str) -> Option<String> {
        let v = self
            .js(
                "const e = document.querySelector(arguments[0]); return e ? e.textContent : null;",
                json!([css]),
            )
            .await;
        v.as_str().map(str::to_owned)
    }

    /// Waits for the element `css` and returns its WebDriver id.
    pub async fn element(&self, css: &str) -> String {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let res = self
                .http
                .post(format!("{}/element", self.url))
                .json(&json!({"using": "css selector", "value": css}))
                .send()
                .await
                .unwrap();
            let ok = res.status().is_success();
            let v: Value = res.json().await.unwrap();
            if ok {
                return v["value"][ELEMENT].as_str().unwrap().to_string();
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no element {css}: {v}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Clicks the element `css` as a user would (it must be visible and enabled).
    pub async fn click(&self, css: &str) {
        let id = self.element(css).await;
        self.cmd(&format!("element/{id}/click"), json!({})).await;
    }

    /// Types `text` into the element `css` (WebDriver key codes work: "\u{E007}" is Enter).
    pub async fn type_into(&self, css: &str, text: &str) {
        let id = self.element(css).await;
        self.cmd(&format!("element/{id}/value"), json!({ "text": text }))
            .await;
    }

    /// Presses a key on the keyboard ("\u{E004}" is Tab).
    pub async fn press(&self, key: &str) {
        let actions = json!({"actions": [{"type": "key", "id": "keyboard", "actions": [
            {"type": "keyDown", "value": key}, {"type": "keyUp", "value": key}]}]});
        self.cmd("actions", actions).await;
    }

    /// The browser console entries since the last call.
    pub async fn console(&self) -> Vec<Value> {
        let v = self.cmd("se/log", json!({"type": "browser"})).await;
        v.as_array().cloned().unwrap_or_default()
    }

    /// Saves a PNG screenshot of the window to `path`.
    pub async fn screenshot(&self, path: &Path) {
        let v = self.get("screenshot").await;
        let png = base64_decode(v.as_str().expect("screenshot is base64"));
        assert!(png.starts_with(b"\x89PNG"), "a screenshot is a PNG");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, png).unwrap();
        eprintln!("screenshot: {}", path.display());
    }

    pub async fn close(self) {
        let _ = self.http.delete(&self.url).send().await;
    }
}

fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    };
    let bytes: Vec<u8> = s
        .bytes()
        .filter(|c| !c.is_ascii_whitespace() && *c != b'=')
        .collect();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let mut n = 0u32;
        for (i, c) in chunk.iter().enumerate() {
            n |= u32::from(val(*c)) << (18 - 6 * i);
        }
        let b = n.to_be_bytes();
        out.extend_from_slice(&b[1..chunk.len()]);
    }
    out
}

/// Accessibility checks run in the page; returns the problems found.
pub const A11Y_CHECK: &str = r#"
const p = [];
const visible = (e) => !!(e.offsetWidth || e.offsetHeight || e.getClientRects().length);
if (!document.documentElement.lang) p.push("<html> has no lang");
if (!document.title.trim()) p.push("the page has no title");
if (!document.querySelector('meta[name=viewport]')) p.push("no viewport meta (phones)");
if (document.querySelectorAll("h1").length !== 1) p.push("not exactly one h1");
if (!document.querySelector("main")) p.push("no main landmark");
let last = 0;
for (const h of document.querySelectorAll("h1,h2,h3,h4,h5,h6")) {
  if (!visible(h)) continue;
  const l = Number(h.tagName[1]);
  if (l > last + 1) p.push("heading level skips to " + h.tagName + ": " + h.textContent);
  last = l;
}
for (const i of document.querySelectorAll("input,select,textarea")) {
  if (i.type === "hidden") continue;
  const lab = (i.id && document.querySelector('label[for="' + CSS.escape(i.id) + '"]')) || i.closest("label");
  if (!(lab && lab.textContent.trim()) && !i.getAttribute("aria-label") && !i.getAttribute("aria-labelledby"))
    p.push("input without a label: " + (i.id || i.name));
}
for (const img of document.querySelectorAll("img")) if (!img.hasAttribute("alt")) p.push("img without alt: " + img.src);
for (const b of document.querySelectorAll("button,a[href],[role=button]")) {
  const name = (b.textContent || "").trim() || b.getAttribute("aria-label") || b.getAttribute("title");
  if (!name) p.push("a " + b.tagName.toLowerCase() + " without a name");
}
const ids = new Set();
for (const e of document.querySelectorAll("[id]")) { if (ids.has(e.id)) p.push("duplicate id " + e.id); ids.add(e.id); }
let focusRule = false;
for (const s of document.styleSheets) for (const r of s.cssRules) {
  if (r.selectorText && r.selectorText.includes(":focus-visible") && /outline:\s*[1-9]/.test(r.cssText)) focusRule = true;
}
if (!focusRule) p.push("no visible focus style");
if (document.documentElement.scrollWidth > window.innerWidth + 1) p.push("the page scrolls sideways at " + window.innerWidth + " px");
const rgb = (s) => { const m = s.match(/[\d.]+/g) || []; return m.map(Number); };
const lum = ([r, g, b]) => { const f = (c) => { c /= 255; return c <= 0.03928 ? c / 12.92 : Math.pow((c + 0.055) / 1.055, 2.4); }; return 0.2126 * f(r) + 0.7152 * f(g) + 0.0722 * f(b); };
const bg = (e) => { for (; e; e = e.parentElement) { const c = rgb(getComputedStyle(e).backgroundColor); if (c.length === 3 || (c.length === 4 && c[3] > 0.9)) return c.slice(0, 3); } return [255, 255, 255]; };
for (const e of document.querySelectorAll("body *")) {
  if (!visible(e) || e.closest("[disabled],svg")) continue;
  if (![...e.childNodes].some((n) => n.nodeType === 3 && n.textContent.trim())) continue;
  const cs = getComputedStyle(e);
  if (Number(cs.opacity) < 0.5) continue;
  const a = lum(rgb(cs.color).slice(0, 3)), b = lum(bg(e));
  const ratio = (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
  const large = parseFloat(cs.fontSize) >= 24 || (parseFloat(cs.fontSize) >= 18.6 && Number(cs.fontWeight) >= 700);
  if (ratio < (large ? 3 : 4.5)) p.push("low contrast (" + ratio.toFixed(2) + "): " + e.textContent.trim().slice(0, 40));
}
return p;
"#;

/// Bytes of the document and everything it loaded so far.
pub const PAGE_BYTES: &str = r#"
let total = 0;
for (const e of performance.getEntriesByType("navigation").concat(performance.getEntriesByType("resource")))
  total += Math.max(e.decodedBodySize || 0, e.encodedBodySize || 0, e.transferSize || 0);
return total;
"#;
