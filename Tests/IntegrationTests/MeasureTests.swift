import Foundation
import XCTest

/// `rawmount measure` against `qemu-img measure` on the same images (qcow2, QED, VDI, VMDK,
/// raw, a backing chain, bitmaps, snapshots): the same output, text and JSON; and what
/// `rawmount convert` then writes fits in the required size.
final class MeasureTests: XCTestCase {
    override func setUpWithError() throws { try Harness.requireFuse() }

    func testMeasureSaysWhatQemuImgMeasureSays() throws {
        let s = try Scratch()
        var images: [String] = []
        for fmt in ["qcow2", "qed", "vdi", "vmdk", "raw"] {
            let p = s.path("in.\(fmt)")
            try Harness.run(["qemu-img", "create", "-q", "-f", fmt, p, "100M"])
            try Harness.run(["qemu-io", "-f", fmt, "-c", "write -P 1 0 3M", "-c", "write -P 2 50M 100k", "-c", "write -P 3 70001k 3k", p])
            images.append(p)
        }
        // Zeros, a backing chain, bitmaps and a snapshot.
        let q = images[0]
        try Harness.run(["qemu-io", "-c", "write -z 10M 1M", q])
        try Harness.run(["qemu-img", "bitmap", "--add", q, "daily"])
        try Harness.run(["qemu-img", "bitmap", "--add", "-g", "512k", q, "a-longer-bitmap-name"])
        try Harness.run(["qemu-img", "snapshot", "-c", "snap", q])
        try Harness.run(["qemu-io", "-c", "write -P 4 90M 2M", q])
        let top = s.path("top.qcow2")
        try Harness.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "in.qed", "-F", "qed", top])
        try Harness.run(["qemu-io", "-c", "write -P 5 60M 64k", top])
        images.append(top)
        let optionSets: [[String]] = [[], ["-O", "qcow2"], ["-O", "qcow2", "-o", "cluster_size=4k,refcount_bits=1"],
                                      ["-O", "qcow2", "-o", "cluster_size=512,refcount_bits=64"], ["-O", "qcow2", "-o", "extended_l2=on,cluster_size=128k"],
                                      ["-O", "qcow2", "-o", "compat=0.10"], ["-O", "qcow2", "-o", "backing_file=x.qcow2"],
                                      ["-O", "qcow2", "--output=json"], ["-O", "raw", "--output=json"]]
        var compared = 0
        for image in images {
            for options in optionSets {
                let theirs = try Harness.run(["qemu-img", "measure"] + options + [image])
                let ours = try Harness.run([Harness.rawmount, "measure"] + options + [image])
                XCTAssertEqual(ours.out, theirs.out, "\(options) \(image)")
                compared += 1
            }
        }
        for options in [["-l", "snap", "-O", "qcow2"], ["--size", "10G"], ["--size", "7T", "-O", "qcow2", "-o", "cluster_size=2M"]] {
            let args = options + (options.contains("-l") ? [q] : [])
            XCTAssertEqual(try Harness.run([Harness.rawmount, "measure"] + args).out, try Harness.run(["qemu-img", "measure"] + args).out, "\(args)")
        }
        XCTAssertEqual(compared, images.count * optionSets.count)
        // What convert writes fits.
        for image in images {
            let out = s.path("out.qcow2")
            try Harness.run([Harness.rawmount, "convert", "-O", "qcow2", image, out])
            let m = try Harness.run([Harness.rawmount, "measure", "-O", "qcow2", image]).out
            let required = m.split(separator: "\n").first { $0.hasPrefix("required size: ") }.flatMap { UInt64($0.dropFirst("required size: ".count)) } ?? 0
            XCTAssertLessThanOrEqual(try Files.size(out), required, image)
            try FileManager.default.removeItem(atPath: out)
        }
        // Usage errors as qemu-img's: both or neither of IMAGE and --size; formats it does not measure.
        for bad in [["measure"], ["measure", "--size", "1G", q], ["measure", "-O", "vmdk", q], ["measure", "-O", "qcow2", "-o", "cluster_size=4k,extended_l2=on", q]] {
            XCTAssertEqual(try Harness.run([Harness.rawmount] + bad, check: false).status, 1, "\(bad)")
            XCTAssertEqual(try Harness.run(["qemu-img"] + bad, check: false).status, 1, "qemu-img \(bad)")
        }
    }
}
