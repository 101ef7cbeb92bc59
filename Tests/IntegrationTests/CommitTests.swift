import Foundation
import XCTest

/// `rawmount commit` against `qemu-img commit` on copies of the same chains: the base ends
/// equal to qemu-img's, the committed image reads as before and (without -d) holds nothing.
final class CommitTests: XCTestCase {
    override func setUpWithError() throws { try Harness.requireFuse() }

    /// base <- mid <- top, each with its own writes, for `who`.
    private func chain(_ s: Scratch, _ who: String, format: String) throws -> (base: String, mid: String, top: String) {
        let base = s.path("base-\(who).\(format)"), mid = s.path("mid-\(who).\(format)"), top = s.path("top-\(who)-over-\(format).qcow2")
        try Harness.run(["qemu-img", "create", "-q", "-f", format, base, "32M"])
        try Harness.run(["qemu-io", "-f", format, "-c", "write -P 1 0 8M", "-c", "write -P 2 16M 2M", base])
        try Harness.run(["qemu-img", "create", "-q", "-f", format, "-b", PathName(base), "-F", format, mid])
        try Harness.run(["qemu-io", "-f", format, "-c", "write -P 3 4M 1M", "-c", "write -z 17M 64k", mid])
        try Harness.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", PathName(mid), "-F", format, top])
        try Harness.run(["qemu-io", "-f", "qcow2", "-c", "write -P 9 1M 64k", "-c", "write -z 16M 128k", "-c", "write -P 4 24M 4k",
                         "-c", "write -P 5 31M 1M", top])
        return (base, mid, top)
    }

    private func PathName(_ p: String) -> String { (p as NSString).lastPathComponent }

    func testCommitEndsAsQemuImgCommitEnds() throws {
        let s = try Scratch()
        for format in ["qcow2", "qed"] {
            let cases: [(label: String, extra: [String])] = [("into the backing file", []), ("-d", ["-d"]), ("-b base", ["-b"])]
            for (label, extra) in cases {
                let ours = try chain(s, "ours", format: format), theirs = try chain(s, "theirs", format: format)
                let before = s.path("before.raw")
                try Harness.run(["qemu-img", "convert", "-O", "raw", ours.top, before])
                let args: (String, String) -> [String] = { base, top in
                    extra == ["-b"] ? ["-b", base, top] : extra + [top]
                }
                let r = try Harness.run([Harness.rawmount, "commit"] + args(ours.base, ours.top), check: false)
                XCTAssertEqual(r.status, 0, "\(format) \(label): \(r.err)")
                try Harness.run(["qemu-img", "commit", "-q"] + args(theirs.base, theirs.top))
                let target = extra == ["-b"] ? (ours.base, theirs.base) : (ours.mid, theirs.mid)
                XCTAssertEqual(try Harness.run(["qemu-img", "compare", "-f", format, "-F", format, target.0, target.1], check: false).status, 0,
                               "\(format) \(label): the base differs from qemu-img's")
                XCTAssertEqual(try Harness.run(["qemu-img", "check", "-q", "-f", format, target.0], check: false).status, 0, "\(format) \(label)")
                XCTAssertEqual(try Harness.run(["qemu-img", "check", "-q", ours.top], check: false).status, 0, "\(format) \(label)")
                XCTAssertEqual(try Harness.run(["qemu-img", "compare", ours.top, before], check: false).status, 0, "\(format) \(label): the disk changed")
                let own = try Harness.run(["qemu-img", "map", "--output=json", ours.top]).out.split(separator: "\n").filter { $0.contains("\"depth\": 0") }
                // Emptied only without -d and -b (qemu-img keeps it with -b too).
                XCTAssertEqual(own.isEmpty, extra.isEmpty, "\(format) \(label): \(own)")
            }
        }
    }

    /// A kill -9 before each host write and sync of a commit: the image's disk reads as
    /// before (the base is durable before the image is emptied), and both files check clean
    /// but for leaked clusters.
    func testAKillAtEveryWriteOfACommitKeepsTheDisk() throws {
        let s = try Scratch()
        let (_, _, countTop) = try chain(s, "count", format: "qcow2")
        let report = s.path("ops")
        try Harness.run(["env", "RAWMOUNT_TEST_FAULT=write,sync:0:eio", "RAWMOUNT_TEST_FAULT_REPORT=\(report)", Harness.rawmount, "commit", "-q", countTop])
        let total = try Harness.writesAndSyncs(inReport: report)
        XCTAssertGreaterThan(total, 5, (try? String(contentsOfFile: report, encoding: .utf8)) ?? report)
        for n in stride(from: 1, through: total, by: max(1, total / 40)) {
            let (base, mid, top) = try chain(s, "k", format: "qcow2")
            let before = s.path("k-before.raw")
            try Harness.run(["qemu-img", "convert", "-O", "raw", top, before])
            let r = try Harness.run(["env", "RAWMOUNT_TEST_FAULT=write,sync:\(n):kill", Harness.rawmount, "commit", "-q", top], check: false)
            XCTAssertNotEqual(r.status, 0, "op \(n) was not reached")
            XCTAssertEqual(try Harness.run(["qemu-img", "compare", top, before], check: false).status, 0, "op \(n): the disk changed")
            for f in [top, mid, base] {
                let c = try Harness.run(["qemu-img", "check", "-q", f], check: false).status
                XCTAssertTrue(c == 0 || c == 3, "op \(n): \(f) check exit \(c)")
            }
        }
    }
}
