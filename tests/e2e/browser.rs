//! The dashboard in a real browser: headless Chromium driven over WebDriver
//! (chromedriver). Skipped with a message where chromedriver is not
//! installed, unless DROVER_REQUIRE_BROWSER is set (CI sets it).

use crate::harness::*;
use serde_json::{json, Value};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

struct Driver {
    child: Child,
    base: String,
    session: String,
    http: ureq::Agent,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self
            .http
            .delete(&format!("{}/session/{}", self.base, self.session))
            .call();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn call(http: &ureq::Agent, method: &str, url: &str, body: Option<Value>) -> TestResult<Value> {
    let req = http.request(method, url);
    let resp = match body {
        Some(b) => req.send_json(b),
        None => req.call(),
    };
    let resp = match resp {
        Ok(r) => r,
        Err(ureq::Error::Status(code, r)) => {
            return Err(format!(
                "webdriver {method} {url}: {code} {}",
                r.into_string().unwrap_or_default()
            )
            .into())
        }
        Err(e) => return Err(format!("webdriver {method} {url}: {e}").into()),
    };
    let v: Value = resp.into_json()?;
    Ok(v["value"].clone())
}

impl Driver {
    fn start(binary: &str) -> TestResult<Driver> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let child = Command::new(binary)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let base = format!("http://127.0.0.1:{port}");
        let http = ureq::AgentBuilder::new()
            .timeout(Duration::from_secs(60))
            .build();
        wait_for("chromedriver", Duration::from_secs(20), || {
            Ok(http.get(&format!("{base}/status")).call().ok())
        })?;
        let caps = json!({"capabilities": {"alwaysMatch": {"goog:chromeOptions": {
            "binary": chromium(),
            "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     "--disable-dev-shm-usage", "--window-size=1400,1000"]}}}});
        let session = call(&http, "POST", &format!("{base}/session"), Some(caps))?;
        let session = session["sessionId"]
            .as_str()
            .ok_or("no session id")?
            .to_string();
        Ok(Driver {
            child,
            base,
            session,
            http,
        })
    }

    fn post(&self, path: &str, body: Value) -> TestResult<Value> {
        call(
            &self.http,
            "POST",
            &format!("{}/session/{}{path}", self.base, self.session),
            Some(body),
        )
    }

    fn get(&self, path: &str) -> TestResult<Value> {
        call(
            &self.http,
            "GET",
            &format!("{}/session/{}{path}", self.base, self.session),
            None,
        )
    }

    /// Element ids matching a CSS selector.
    fn find(&self, css: &str) -> TestResult<Vec<String>> {
        let found = self.post("/elements", json!({"using": "css selector", "value": css}))?;
        Ok(found
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .filter_map(|e| e.as_object()?.values().next()?.as_str().map(str::to_string))
            .collect())
    }

    /// Runs `js` in the page (with `args`) and returns its value. The live
    /// dashboard re-renders every few seconds: anything read or clicked is
    /// found and used within one script, so no element reference can go
    /// stale between two WebDriver calls.
    fn script(&self, js: &str, args: Value) -> TestResult<Value> {
        self.post("/execute/sync", json!({"script": js, "args": args}))
    }

    /// The text of every element matching `css`, read in one go.
    fn texts(&self, css: &str) -> TestResult<Vec<String>> {
        let v = self.script(
            "return [...document.querySelectorAll(arguments[0])].map(e => e.innerText);",
            json!([css]),
        )?;
        Ok(v.as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .filter_map(|t| t.as_str().map(str::to_string))
            .collect())
    }

    /// Clicks the first element matching `css`; false when there is none.
    fn click(&self, css: &str) -> TestResult<bool> {
        let v = self.script(
            "const e = document.querySelector(arguments[0]); if (!e) return false; e.click(); return true;",
            json!([css]),
        )?;
        Ok(v == json!(true))
    }
}

fn chromium() -> &'static str {
    [
        "/usr/bin/chromium",
        "/usr/bin/chromium-browser",
        "/usr/bin/google-chrome",
    ]
    .into_iter()
    .find(|p| std::path::Path::new(p).exists())
    .unwrap_or("/usr/bin/chromium")
}

#[test]
fn dashboard_shows_the_fleet_and_approves_a_worker() -> TestResult {
    let Some(driver_bin) = ["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
    else {
        if std::env::var_os("DROVER_REQUIRE_BROWSER").is_some() {
            return Err(
                "chromedriver is not installed (apt-get install chromium chromium-driver)".into(),
            );
        }
        println!(
            "skipped: chromedriver is not installed (apt-get install chromium chromium-driver)"
        );
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    let coord = Coordinator::start(dir.path(), &["--lease-ttl", "3"])?;
    let api = coord.api();
    let gpu = Agent::start(
        &coord.url,
        dir.path(),
        "gpu-box",
        &["--fake-gpus", "2xA100:81920", "--tags", "cuda12"],
    )?;
    let cpu = Agent::start(&coord.url, dir.path(), "cpu-box", &[])?;
    let gpu_id = wait_for("the GPU agent", Duration::from_secs(20), || {
        Ok(gpu.worker_id().ok())
    })?;
    let cpu_id = wait_for("the CPU agent", Duration::from_secs(20), || {
        Ok(cpu.worker_id().ok())
    })?;
    api.admin("POST", &format!("/api/v1/workers/{cpu_id}/approve"), None)?;
    let job = api.submit(&json!({"command": ["sh", "-c", "echo hello from the browser test"]}))?;

    let d = Driver::start(driver_bin)?;
    d.post(
        "/url",
        json!({"url": format!("{}/#token={ADMIN}", coord.url)}),
    )?;
    let texts = wait_for("two worker cards", Duration::from_secs(20), || {
        let texts = d.texts(".worker")?;
        Ok((texts.len() == 2).then_some(texts))
    })?;
    let all = texts.join("\n");
    assert!(all.contains("gpu-box") && all.contains("cpu-box"), "{all}");
    assert!(
        all.contains("pending"),
        "the GPU box waits for approval: {all}"
    );
    assert!(all.contains("A100"), "GPUs are shown: {all}");
    let pending = d.find(&format!(".worker.pending[data-worker=\"{gpu_id}\"]"))?;
    assert_eq!(pending.len(), 1, "the pending card is grey-classed");

    // Approve from the page.
    let approve = format!(".worker[data-worker=\"{gpu_id}\"] button[data-action=\"approve\"]");
    assert!(d.click(&approve)?, "an Approve button on the pending card");
    wait_for("the approval", Duration::from_secs(20), || {
        let w = api.admin("GET", &format!("/api/v1/workers/{gpu_id}"), None)?;
        Ok((w.body["state"] == "idle").then_some(()))
    })?;
    wait_for("the card to turn idle", Duration::from_secs(20), || {
        Ok((d
            .find(&format!(".worker.idle[data-worker=\"{gpu_id}\"]"))?
            .len()
            == 1)
            .then_some(()))
    })?;
    // The worker's detail follows its agent's own log live.
    d.click(&format!(".worker[data-worker=\"{gpu_id}\"] .name"))?;
    wait_for(
        "the agent's log in the detail",
        Duration::from_secs(20),
        || {
            let text = d.texts("#agent-log")?.concat();
            Ok(text.contains("agent running worker_id=").then_some(()))
        },
    )?;
    // Every card's buttons stay inside it, also at the grid's narrowest
    // card (two 260 px columns in a 580 px window): they wrap.
    d.post("/window/rect", json!({"width": 580, "height": 900}))?;
    let overflow = d.script(
        "return [...document.querySelectorAll('.worker')].filter(c => { \
           const r = c.getBoundingClientRect(); \
           return [...c.querySelectorAll('button')].some(b => { \
             const q = b.getBoundingClientRect(); return q.right > r.right + 0.5 || q.left < r.left - 0.5; }); \
         }).length;",
        json!([]),
    )?;
    assert_eq!(overflow, json!(0), "a button sticks out of its worker card");

    // The jobs table shows the job, and its detail shows its log.
    wait_for("the job to succeed", Duration::from_secs(20), || {
        Ok((api.job(job)?["status"] == "succeeded").then_some(()))
    })?;
    wait_for("the job row", Duration::from_secs(20), || {
        Ok(d.click("#jobs tbody tr")?.then_some(()))
    })?;
    wait_for(
        "the job's log in the detail",
        Duration::from_secs(20),
        || {
            let logs = d.texts("#detail pre.log")?;
            Ok(logs
                .iter()
                .any(|l| l.contains("hello from the browser test"))
                .then_some(()))
        },
    )?;
    let shot = d.get("/screenshot")?;
    println!(
        "dashboard screenshot: {} bytes of base64 PNG",
        shot.as_str().map(|s| s.len()).unwrap_or(0)
    );

    // A read token: the same fleet, no buttons that would change it.
    let r = api.admin(
        "POST",
        "/api/v1/tokens",
        Some(&json!({"name": "viewer", "role": "read"})),
    )?;
    let viewer = r.body["token"].as_str().ok_or("no token")?;
    d.post(
        "/url",
        json!({"url": format!("{}/?as=viewer#token={viewer}", coord.url)}),
    )?;
    wait_for("the viewer's role shown", Duration::from_secs(20), || {
        Ok(d.texts("#role")?.concat().contains("read").then_some(()))
    })?;
    wait_for("the viewer's worker cards", Duration::from_secs(20), || {
        Ok((d.texts(".worker")?.len() == 2).then_some(()))
    })?;
    assert_eq!(
        d.find(".worker button")?.len(),
        0,
        "a read token's dashboard offers no worker actions"
    );
    Ok(())
}
