//! Servers a test starts on 127.0.0.1 (a file server, a registry) and
//! waits for.

use crate::workspace;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A free TCP port on 127.0.0.1 (for a server a test starts).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Wait up to 10 s for `child` to listen on `port`; if it does not, it is
/// killed and the test fails with `what` and `log`'s text.
pub fn await_listening(child: &mut std::process::Child, port: u16, what: &str, log: &Path) {
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!(
        "{what} did not start: {}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
}

/// tests/tools/httpserve.py serving `dir` on a free port, stopped on drop.
pub struct HttpServer {
    child: std::process::Child,
    port: u16,
    log: PathBuf,
    scheme: &'static str,
}

impl HttpServer {
    pub fn start(dir: &Path, args: &[&str]) -> HttpServer {
        let port = free_port();
        let log = dir.join(format!("http-{port}.log"));
        let mut child = Command::new("python3")
            .arg(workspace().join("tests/tools/httpserve.py"))
            .arg(dir)
            .arg(port.to_string())
            .arg("--log")
            .arg(&log)
            .args(args)
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        await_listening(&mut child, port, "httpserve.py", &log);
        let scheme = if args.contains(&"--tls") {
            "https"
        } else {
            "http"
        };
        HttpServer {
            child,
            port,
            log,
            scheme,
        }
    }
    pub fn url(&self, name: &str) -> String {
        format!("{}://127.0.0.1:{}/{name}", self.scheme, self.port)
    }
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
