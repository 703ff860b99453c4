//! A page in headless Chromium, for the tests of the pages people read.

/// A page in headless Chromium, driven through the DevTools protocol.
pub struct LivePage {
    chromium: std::process::Child,
    devtools: tungstenite::WebSocket<tungstenite::stream::MaybeTlsStream<std::net::TcpStream>>,
    next_id: u64,
    _profile: tempfile::TempDir,
}

impl LivePage {
    pub fn open(url: &str) -> Self {
        let profile = tempfile::tempdir().expect("profile dir");
        let chromium = std::process::Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-background-networking",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg(url)
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect(
                "this test needs Chromium (Debian: apt-get install chromium); .ci/run installs it",
            );
        // Chromium names its DevTools port in the profile once it listens.
        let port_file = profile.path().join("DevToolsActivePort");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        let port = loop {
            if let Some(port) = std::fs::read_to_string(&port_file)
                .ok()
                .and_then(|text| text.lines().next().and_then(|l| l.parse::<u16>().ok()))
            {
                break port;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "Chromium did not open DevTools"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        };
        let targets: serde_json::Value = ureq::get(&format!("http://127.0.0.1:{port}/json/list"))
            .call()
            .expect("DevTools answers")
            .body_mut()
            .read_json()
            .expect("targets");
        let page = targets
            .as_array()
            .and_then(|targets| targets.iter().find(|t| t["type"] == "page"))
            .and_then(|t| t["webSocketDebuggerUrl"].as_str())
            .expect("a page target")
            .to_owned();
        let (devtools, _) = tungstenite::connect(page).expect("DevTools websocket");
        Self {
            chromium,
            devtools,
            next_id: 0,
            _profile: profile,
        }
    }

    /// The value of a JavaScript expression in the page.
    pub fn eval(&mut self, expression: &str) -> serde_json::Value {
        self.next_id += 1;
        let id = self.next_id;
        let call = serde_json::json!({
            "id": id, "method": "Runtime.evaluate",
            "params": {"expression": expression, "returnByValue": true},
        });
        self.devtools
            .send(tungstenite::Message::text(call.to_string()))
            .expect("send to DevTools");
        loop {
            let message = self.devtools.read().expect("read from DevTools");
            let Ok(text) = message.to_text() else {
                continue;
            };
            let answer: serde_json::Value = serde_json::from_str(text).expect("JSON");
            if answer["id"] == id {
                return answer["result"]["result"]["value"].clone();
            }
        }
    }

    /// Sends a DevTools command and returns its result (panics on an error).
    pub fn command(&mut self, method: &str, params: serde_json::Value) -> serde_json::Value {
        self.next_id += 1;
        let id = self.next_id;
        let call = serde_json::json!({"id": id, "method": method, "params": params});
        self.devtools
            .send(tungstenite::Message::text(call.to_string()))
            .expect("send to DevTools");
        loop {
            let message = self.devtools.read().expect("read from DevTools");
            let Ok(text) = message.to_text() else {
                continue;
            };
            let answer: serde_json::Value = serde_json::from_str(text).expect("JSON");
            if answer["id"] == id {
                assert!(
                    answer["error"].is_null(),
                    "DevTools refused {method}: {}",
                    answer["error"]
                );
                return answer["result"].clone();
            }
        }
    }

    /// Lays the page out as in a browser window `width` by `height` CSS
    /// pixels.
    pub fn set_viewport(&mut self, width: u32, height: u32) {
        self.command(
            "Emulation.setDeviceMetricsOverride",
            serde_json::json!({
                "width": width, "height": height,
                "deviceScaleFactor": 1, "mobile": false,
            }),
        );
    }

    /// Writes a PNG of the whole page (beyond the viewport too) to `path`.
    pub fn screenshot(&mut self, path: &std::path::Path) {
        use base64::Engine as _;
        let metrics = self.command("Page.getLayoutMetrics", serde_json::json!({}));
        let size = &metrics["cssContentSize"];
        let (width, height) = (
            size["width"].as_f64().expect("the page's width"),
            size["height"].as_f64().expect("the page's height"),
        );
        let shot = self.command(
            "Page.captureScreenshot",
            serde_json::json!({
                "format": "png",
                "captureBeyondViewport": true,
                "clip": {"x": 0, "y": 0, "width": width, "height": height, "scale": 1},
            }),
        );
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().expect("the screenshot's data"))
            .expect("base64");
        assert!(png.starts_with(b"\x89PNG"), "a PNG");
        std::fs::write(path, png).expect("write the screenshot");
    }

    /// Polls `expression` until it is true; the time it took, or `None`
    /// after `within`.
    pub fn wait_until(
        &mut self,
        expression: &str,
        within: std::time::Duration,
    ) -> Option<std::time::Duration> {
        let start = std::time::Instant::now();
        while start.elapsed() < within {
            if self.eval(expression) == serde_json::Value::Bool(true) {
                return Some(start.elapsed());
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        None
    }
}

impl Drop for LivePage {
    fn drop(&mut self) {
        let _ = self.chromium.kill();
        let _ = self.chromium.wait();
    }
}
