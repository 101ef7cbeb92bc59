import Foundation
import XCTest

/// `convert -B`: the new image is backed by the given file and holds only what differs
/// from it (qemu-img 7.2 copies everything again); read through the chain by qemu-img, it
/// equals the source.
final class ConvertBackingTests: XCTestCase {
    override func setUpWithError() throws { try Harness.requireFuse() }

    func testConvertWithBackingWritesOnlyWhatDiffers() throws {
        let s = try Scratch()
        for fmt in ["qcow2", "qed"] {
            let base = s.path("base.\(fmt)"), full = s.path("full.qcow2"), out = s.path("top.\(fmt)")
            try Harness.run(["qemu-img", "create", "-q", "-f", fmt, base, "32M"])
            try Harness.run(["qemu-io", "-f", fmt, "-c", "write -P 1 0 8M", "-c", "write -P 2 16M 2M", base])
            try Harness.run(["qemu-img", "convert", "-O", "qcow2", base, full])
            // Changes: new data, zeros over backing data, data where the backing has none.
            try Harness.run(["qemu-io", "-f", "qcow2", "-c", "write -P 3 1M 64k", "-c", "write -z 16M 128k",
                             "-c", "write -P 4 24M 4k", full])
            try Harness.run([Harness.rawmount, "convert", "-O", fmt, "-B", base, "-F", fmt, full, out])
            XCTAssertEqual(try Harness.run(["qemu-img", "compare", out, full], check: false).status, 0, fmt)
            let map = try Harness.run(["qemu-img", "map", "--output=json", out]).out
            let own = map.split(separator: "\n").filter { $0.contains("\"depth\": 0") && $0.contains("\"data\": true") }
            let bytes = own.compactMap { line -> Int? in
                guard let r = line.firstRange(of: "\"length\": ") else { return nil }
                return Int(line[r.upperBound...].prefix { $0.isNumber })
            }.reduce(0, +)
            // Only the 64 KiB and 4 KiB of new data are the top's own data (a cluster each).
            XCTAssertLessThanOrEqual(bytes, 2 << 20, "\(fmt): \(map)")
            XCTAssertGreaterThan(bytes, 0, "\(fmt): \(map)")
            XCTAssertTrue(try Harness.run(["qemu-img", "info", out]).out.contains("backing file: " + base), fmt)
        }
    }
}
