import Foundation
import XCTest

/// `rawmount rebase` against `qemu-img rebase` on copies of the same images: the guest disk
/// unchanged, the same clusters copied into the image, the new name and format in the header.
final class RebaseTests: XCTestCase {
    override func setUpWithError() throws { try Harness.requireFuse() }

    func testRebaseKeepsTheDiskAsQemuImgDoes() throws {
        let s = try Scratch()
        for compat in ["1.1", "0.10"] {
            let old = s.path("old.qcow2"), new = s.path("new.qcow2"), top = s.path("top.qcow2"), theirs = s.path("theirs.qcow2")
            try Harness.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=\(compat)", old, "32M"])
            try Harness.run(["qemu-io", "-f", "qcow2", "-c", "write -P 1 0 6M", "-c", "write -P 2 16M 2M", old])
            try Harness.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=\(compat)", new, "32M"])
            try Harness.run(["qemu-io", "-f", "qcow2", "-c", "write -P 1 0 3M", "-c", "write -P 5 24M 1M", new])
            try Harness.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=\(compat)", "-b", "old.qcow2", "-F", "qcow2", top])
            try Harness.run(["qemu-io", "-f", "qcow2", "-c", "write -P 9 1M 64k", "-c", "write -P 8 17M 4k", top])
            let before = s.path("before.raw")
            try Harness.run(["qemu-img", "convert", "-O", "raw", top, before])
            try? FileManager.default.removeItem(atPath: theirs)
            try FileManager.default.copyItem(atPath: top, toPath: theirs)
            try Harness.run([Harness.rawmount, "rebase", "-b", "new.qcow2", "-F", "qcow2", top])
            try Harness.run(["qemu-img", "rebase", "-b", "new.qcow2", "-F", "qcow2", theirs])
            XCTAssertEqual(try Harness.run(["qemu-img", "compare", top, before], check: false).status, 0, compat)
            XCTAssertEqual(try Harness.run(["qemu-img", "check", "-q", top], check: false).status, 0, compat)
            let info = try Harness.run(["qemu-img", "info", top]).out
            XCTAssertTrue(info.contains("backing file: new.qcow2") && info.contains("backing file format: qcow2"), info)
            func own(_ p: String) throws -> [Substring] {
                try Harness.run(["qemu-img", "map", "--output=json", p]).out.split(separator: "\n").filter { $0.contains("\"depth\": 0") }
                    .map { $0.split(separator: "\"present\"").first! }  // where, not how (zeros may be zero clusters here)
            }
            XCTAssertEqual(try own(top), try own(theirs), "\(compat): the image holds other ranges than qemu-img's rebase left")
            // No backing file: the image becomes whole.
            try Harness.run([Harness.rawmount, "rebase", "-b", "", top])
            XCTAssertEqual(try Harness.run(["qemu-img", "compare", top, before], check: false).status, 0)
            XCTAssertFalse(try Harness.run(["qemu-img", "info", top]).out.contains("backing file"))
            // Unsafe: only the name, the file need not exist.
            try Harness.run([Harness.rawmount, "rebase", "-u", "-b", "elsewhere/base.qcow2", "-F", "qcow2", theirs])
            XCTAssertTrue(try Harness.run(["qemu-img", "info", "-U", "--output=json", theirs]).out.contains("\"backing-filename\": \"elsewhere/base.qcow2\""))
        }
        // The copy and the header change are one locked step: a writer that comes between
        // them is refused (the rebase pauses there on cue).
        let (base, img) = (s.path("b.qcow2"), s.path("i.qcow2"))
        try Harness.run(["qemu-img", "create", "-q", "-f", "qcow2", base, "8M"])
        try Harness.run(["qemu-io", "-f", "qcow2", "-c", "write -P 3 0 1M", base])
        try Harness.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", img])
        let rebase = Process()
        rebase.executableURL = URL(fileURLWithPath: Harness.rawmount)
        rebase.arguments = ["rebase", "-b", "", img]
        rebase.environment = ProcessInfo.processInfo.environment.merging(["RAWMOUNT_TEST_REBASE_PAUSE_US": "5000000"]) { $1 }
        try rebase.run()
        var refused: CommandResult?, inPause = false
        for _ in 0 ..< 100 {  // until the copy is done and the pause began (the image holds the data)
            usleep(100_000)
            if try Harness.run(["qemu-img", "map", "-U", "--output=json", img]).out.contains("\"depth\": 0, \"present\": true, \"zero\": false, \"data\": true") {
                refused = try Harness.run(["qemu-io", "-f", "qcow2", "-c", "discard 0 1M", img], check: false)
                inPause = rebase.isRunning  // the attempt fell inside the pause
                break
            }
        }
        rebase.waitUntilExit()
        XCTAssertEqual(rebase.terminationStatus, 0)
        XCTAssertNotNil(refused, "the rebase's copy never showed")
        XCTAssertTrue(inPause, "the writer came only after the rebase ended (a slow machine?)")
        XCTAssertTrue(refused.map { $0.status != 0 && $0.err.contains("lock") } ?? false, "a writer came between the copy and the header: \(refused?.err ?? "")")
        XCTAssertEqual(try Harness.run(["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", img, base], check: false).status, 0)
        XCTAssertFalse(try Harness.run(["qemu-img", "info", img]).out.contains("backing file"))

        // Other formats are told why.
        let vdi = s.path("d.vdi")
        try Harness.run(["qemu-img", "create", "-q", "-f", "vdi", vdi, "8M"])
        let r = try Harness.run([Harness.rawmount, "rebase", "-b", "x.vdi", vdi], check: false)
        XCTAssertNotEqual(r.status, 0)
        XCTAssertTrue(r.err.contains("qcow2"), r.err)
    }
}
