import Foundation
import XCTest

/// `rawmount compare` against `qemu-img compare` on the same pairs of images: the same
/// message and the same exit status, for qcow2, QED, VDI and VMDK (and across formats).
final class CompareTests: XCTestCase {
    override func setUpWithError() throws { try Harness.requireFuse() }

    func testCompareSaysWhatQemuImgSays() throws {
        let s = try Scratch()
        var pairs: [[String]] = []
        for fmt in ["qcow2", "qed", "vdi", "vmdk"] {
            func make(_ name: String, _ size: String, _ writes: [String]) throws -> String {
                let p = s.path("\(name).\(fmt)")
                try Harness.run(["qemu-img", "create", "-q", "-f", fmt, p, size])
                if !writes.isEmpty { try Harness.run(["qemu-io", "-f", fmt] + writes.flatMap { ["-c", $0] } + [p]) }
                return p
            }
            let base = try make("base", "8M", ["write -P 1 1M 64k", "write -P 7 5M 4k"])
            let same = try make("same", "8M", ["write -P 7 5M 4k", "write -P 1 1M 64k"])
            let byte = try make("byte", "8M", ["write -P 1 1M 64k", "write -P 7 5M 4k", "write -P 2 3000001 1"])
            let bigZero = try make("bigzero", "16M", ["write -P 1 1M 64k", "write -P 7 5M 4k", "write -z 12M 64k"])
            let bigData = try make("bigdata", "16M", ["write -P 1 1M 64k", "write -P 7 5M 4k", "write -P 3 12M 512"])
            let raw = s.path("base-\(fmt).raw")
            try Harness.run(["qemu-img", "convert", "-O", "raw", base, raw])
            pairs += [[base, same], [base, byte], [byte, base], [base, bigZero], [bigData, base], [base, bigData],
                      ["-s", base, bigZero], ["-s", base, same], [base, raw], ["-q", base, byte], [base, s.path("missing.\(fmt)")]]
        }
        for pair in pairs {
            let q = try Harness.run(["qemu-img", "compare"] + pair, check: false)
            let r = try Harness.run([Harness.rawmount, "compare"] + pair, check: false)
            let what = pair.map { ($0 as NSString).lastPathComponent }.joined(separator: " ")
            XCTAssertEqual(r.status, q.status, "\(what): rawmount \(r.out)\(r.err) qemu-img \(q.out)\(q.err)")
            if q.status < 2 { XCTAssertEqual(r.out, q.out, what) }
        }
    }
}
