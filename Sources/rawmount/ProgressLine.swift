#if canImport(Glibc)
import Glibc
#endif
import BlockEngine

/// Progress on stderr: on a terminal one line redrawn at most 5 times a second (percent,
/// bytes, rate, time left); to a pipe or a log (`-p` asked for it there), a whole line at
/// most once a second and at the end, as scripts and log files want it.
final class Progress {
    enum Mode { case off, terminal, lines }
    let total: UInt64
    let mode: Mode
    var enabled: Bool { mode != .off }
    private let began = monotonicSeconds()
    private var shownAt = 0.0

    init(total: UInt64, mode: Mode) {
        self.total = total
        self.mode = mode
    }

    convenience init(total: UInt64, enabled: Bool) { self.init(total: total, mode: enabled ? .terminal : .off) }

    func show(_ done: UInt64, force: Bool = false) {
        guard enabled else { return }
        let now = monotonicSeconds()
        guard force || now - shownAt >= (mode == .terminal ? 0.2 : 1.0) else { return }
        shownAt = now
        let percent = total == 0 ? 100 : Double(done) * 100 / Double(total)
        let rate = Double(done) / max(now - began, 1e-3)
        var text = "  \(String(format1: percent))% (\(humanSize(done)) of \(humanSize(total)), \(humanSize(UInt64(rate)))/s"
        if done < total, rate > 0 { text += ", \(Self.clock(Double(total - done) / rate)) left" }
        text += ")"
        Self.put(mode == .terminal ? "\r" + text + "\u{1B}[K" : text + "\n")
    }

    /// m:ss, or h:mm:ss from an hour on.
    static func clock(_ seconds: Double) -> String {
        let s = Int(seconds.rounded(.up)), h = s / 3600, m = s / 60 % 60, sec = s % 60
        let two = { (v: Int) in v < 10 ? "0\(v)" : "\(v)" }
        return h > 0 ? "\(h):\(two(m)):\(two(sec))" : "\(m):\(two(sec))"
    }

    private static func put(_ text: String) { _ = text.withCString { write(STDERR_FILENO, $0, strlen($0)) } }

    func finish() {
        guard enabled else { return }
        show(total, force: true)
        if mode == .terminal { Self.put("\n") }
    }
}

extension String {
    /// One decimal place.
    init(format1 v: Double) {
        let tenths = Int((v * 10).rounded())
        self = "\(tenths / 10).\(tenths % 10)"
    }
}
