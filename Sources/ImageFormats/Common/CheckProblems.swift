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
