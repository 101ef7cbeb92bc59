#if canImport(Glibc)
import Glibc
#endif
import BlockEngine

/// A progress line on a terminal (stderr): percent, bytes and rate, at most 5 times a second.
final class Progress {
    let total: UInt64
    let enabled: Bool
    private let began = monotonicSeconds()
    private var shownAt = 0.0

    init(total: UInt64, enabled: Bool) {
        self.total = total
        self.enabled = enabled
    }

    func show(_ done: UInt64, force: Bool = false) {
        guard enabled else { return }
        let now = monotonicSeconds()
        guard force || now - shownAt >= 0.2 else { return }
        shownAt = now
        let percent = total == 0 ? 100 : Double(done) * 100 / Double(total)
        let rate = Double(done) / max(now - began, 1e-3)
        let line = "\r  \(String(format1: percent))% (\(humanSize(done)) of \(humanSize(total)), \(humanSize(UInt64(rate)))/s)\u{1B}[K"
        Self.put(line)
    }

    private static func put(_ text: String) { _ = text.withCString { write(STDERR_FILENO, $0, strlen($0)) } }

    func finish() {
        guard enabled else { return }
        show(total, force: true)
        Self.put("\n")
    }
}

extension String {
    /// One decimal place.
    init(format1 v: Double) {
        let tenths = Int((v * 10).rounded())
        self = "\(tenths / 10).\(tenths % 10)"
    }
}
