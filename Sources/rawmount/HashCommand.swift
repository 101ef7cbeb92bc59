import ArgumentParser
import BlockEngine
import ImageFormats
#if canImport(Glibc)
import Glibc
#endif

struct HashCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "hash",
        abstract: "Hash the guest disk (the raw view, not the container file).",
        discussion: "Prints the digest as `sha256sum --tag` does: ALGORITHM (IMAGE) = HEX. Several --algorithm options hash in one pass. "
            + "Ranges the image holds no data for are hashed as zeros without reading them. With --verify, exits 0 when the digest "
            + "matches and 1 (naming both values) when it does not." + Examples.section("hash"))

    @Option(name: [.customShort("a"), .long], help: "md5, sha1, sha256 or sha512 (repeatable; default sha256, or the one --verify's length names).",
            completion: .list(["md5", "sha1", "sha256", "sha512"]))
    var algorithm: [String] = []

    @Flag(help: "Print JSON for scripts.")
    var json = false

    @Option(help: "Hash only partition N (numbered as the mount's <stem>-pN.raw files).")
    var partition: Int?

    @Option(help: "The expected digest (hex); its length picks the algorithm when --algorithm is not given. Without a digest, the ones the image stores (EWF), as the verify verb.")
    var verify: String?

    @Option(name: [.customShort("f"), .long], help: "Image format; probed when omitted.", completion: .list(ImageFormat.allCases.map(\.rawValue)))
    var format: String?

    @Flag(name: [.customShort("U"), .customLong("force-share")], help: "Take no image lock (the image may change while it is hashed).")
    var forceShare = false

    @Argument(help: "The disk image.", completion: .file())
    var image: String

    func run() throws {
        do {
            if verify == "stored" {
                guard partition == nil, algorithm.isEmpty else {
                    throw BlockError.usage("--verify without a digest checks the whole disk against the image's stored digests: no --partition or --algorithm")
                }
                let device = try ImageOpener.open(path: image, options: .init(writable: false, format: try parseFormat(format), lock: !forceShare))
                defer { try? device.close() }
                return try VerifyCommand.verify(device, image: image, json: json)
            }
            let expected = verify?.lowercased()
            if let expected, expected.isEmpty || !expected.allSatisfy(\.isHexDigit) {
                throw BlockError.usage("--verify \(verify!): not a hex digest")
            }
            var algorithms: [DiskHasher.Algorithm] = []
            for name in algorithm {
                guard let a = DiskHasher.Algorithm(rawValue: name.lowercased()) else {
                    throw BlockError.usage("unknown algorithm '\(name)' (md5, sha1, sha256, sha512)")
                }
                if !algorithms.contains(a) { algorithms.append(a) }
            }
            if algorithms.isEmpty {
                if let expected {
                    guard let a = DiskHasher.Algorithm.allCases.first(where: { $0.hexLength == expected.count }) else {
                        throw BlockError.usage("--verify: a \(expected.count)-digit digest is none of md5 (32), sha1 (40), sha256 (64), sha512 (128)")
                    }
                    algorithms = [a]
                } else {
                    algorithms = [.sha256]
                }
            }
            var checked: DiskHasher.Algorithm?
            if let expected {
                checked = algorithms.first { $0.hexLength == expected.count }
                if checked == nil { throw BlockError.usage("--verify: a \(expected.count)-digit digest matches none of the algorithms asked for") }
            }
            let fmt = try parseFormat(format)
            let device = try ImageOpener.open(path: image, options: .init(writable: false, format: fmt, lock: !forceShare))
            defer { try? device.close() }
            var start: UInt64 = 0, length = device.virtualSize
            if let partition {
                let table = PartitionTable.read(device)
                guard let p = table.partitions.first(where: { $0.index == partition }) else {
                    let have = table.partitions.map { String($0.index) }.joined(separator: ", ")
                    throw BlockError.usage("\(image): no partition \(partition) (\(have.isEmpty ? "the disk has no partitions" : "partitions: " + have))")
                }
                (start, length) = (p.start, p.length)
            }
            let progress = Progress(total: length, enabled: isatty(STDERR_FILENO) == 1 && !json)
            let began = monotonicSeconds()
            let digests = try DiskHasher(device: device, start: start, length: length).run(algorithms) { progress.show($0) }
            progress.finish()
            let seconds = monotonicSeconds() - began
            if json {
                let fields = algorithms.map { "\(jsonString($0.rawValue)): \(jsonString(digests[$0]!))" }
                var out = ["\"image\": \(jsonString(image))", "\"bytes\": \(length)", "\"offset\": \(start)",
                           "\"partition\": \(partition.map(String.init) ?? "null")", "\"seconds\": \((seconds * 1000).rounded() / 1000)",
                           "\"digests\": {\(fields.joined(separator: ", "))}"]
                if let expected, let checked { out.append("\"verified\": \(digests[checked]! == expected)") }
                print("{" + out.joined(separator: ", ") + "}")
            } else {
                let what = partition.map { "\(image) partition \($0)" } ?? image
                for a in algorithms { print("\(a.rawValue.uppercased()) (\(what)) = \(digests[a]!)") }
            }
            if let expected, let checked {
                let got = digests[checked]!
                guard got == expected else {
                    printError("rawmount: \(image): \(checked.rawValue) mismatch: expected \(expected), the disk hashes to \(got)")
                    throw ExitCode.failure
                }
                if !json { printError("rawmount: \(image): \(checked.rawValue) matches") }
            }
        } catch let e as ExitCode {
            throw e
        } catch {
            printError("rawmount: \(describe(error))")
            throw ExitCode(2)
        }
    }
}
