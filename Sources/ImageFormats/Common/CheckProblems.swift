/// The problems a `check` found: every one counted, the first `kept` described (a badly
/// damaged image would otherwise print millions of lines).
public struct CheckProblems: Sendable {
    static let kept = 20
    public private(set) var lines: [String] = []
    public private(set) var count = 0

    mutating func add(_ text: String) {
        count += 1
        if lines.count < Self.kept { lines.append(text) }
    }

    /// "; N errors:" and the kept lines, indented (empty when there are none).
    public var report: String {
        guard count > 0 else { return "" }
        return "; \(count) errors:\n  " + lines.joined(separator: "\n  ") + (count > lines.count ? "\n  ..." : "")
    }
}

extension CheckProblems {
    /// Reports every pair of neighbouring blocks (sorted `starts`, each `span` bytes; `unit`
    /// bytes per start value) that overlap: two table entries sharing host space.
    mutating func overlapping<S: BinaryInteger>(_ starts: [S], unit: UInt64, span: UInt64) {
        for (a, b) in zip(starts, starts.dropFirst()) where UInt64(a) * unit + span > UInt64(b) * unit {
            add("the blocks at \(UInt64(a) * unit) and \(UInt64(b) * unit) overlap")
        }
    }
}
