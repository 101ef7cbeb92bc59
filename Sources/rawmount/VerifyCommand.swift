import ArgumentParser
import BlockEngine
import ImageFormats
#if canImport(Glibc)
import Glibc
#endif

/// Recomputes the disk's digests and compares them with the ones the image stores (EWF's
/// MD5 and SHA-1 of the acquired media), as ewfverify does.
struct VerifyCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "verify",
        abstract: "Check evidence against the digests it stores (EWF's MD5/SHA-1 of the acquired media).",
        discussion: "Reads the whole disk, every chunk checked against its own checksum, hashes it with each algorithm the image "
            + "stores a digest for, and compares. Exit status: 0 every stored digest matches, 1 one does not, 2 the image "
            + "cannot be read (a damaged chunk, a missing segment) or stores no digest. Progress goes to a terminal."
            + Examples.section("verify"))

    @Flag(help: "Print JSON for scripts.")
    var json = false

    @Flag(name: [.customShort("U"), .customLong("force-share")], help: "Take no image lock.")
    var forceShare = false

    @Argument(help: "The image (an EWF set's first segment, .E01 or .s01).", completion: .file())
    var image: String

    func run() throws {
        do {
            let device = try ImageOpener.open(path: image, options: .init(writable: false, format: nil, lock: !forceShare))
            defer { try? device.close() }
            try Self.verify(device, image: image, json: json)
        } catch let e as ExitCode {
            throw e
        } catch {
            printError("rawmount: \(describe(error))")
            throw ExitCode(2)
        }
    }

    /// Hashes `device` with the algorithms of its stored digests and compares; throws
    /// ExitCode 1 on a mismatch, `usage` when it stores none.
    static func verify(_ device: BlockDevice, image: String, json: Bool) throws {
        let stored = device.driver.storedDigests.compactMap { s in DiskHasher.Algorithm(rawValue: s.algorithm).map { ($0, s.hex) } }
        guard !stored.isEmpty else {
            throw BlockError.usage("\(image): the image stores no digest to verify against"
                + " (\(device.driver.info.format) images store none; give one: rawmount hash --verify HEX)")
        }
        let progress = Progress(total: device.virtualSize, enabled: isatty(STDERR_FILENO) == 1 && !json)
        let began = monotonicSeconds()
        let digests = try DiskHasher(device: device, start: 0, length: device.virtualSize).run(stored.map(\.0)) { progress.show($0) }
        progress.finish()
        let seconds = monotonicSeconds() - began
        let results = stored.map { (algorithm: $0.0, stored: $0.1, computed: digests[$0.0]!) }
        let ok = results.allSatisfy { $0.stored == $0.computed }
        if json {
            let items = results.map {
                "{\"algorithm\": \(jsonString($0.algorithm.rawValue)), \"stored\": \(jsonString($0.stored)), "
                    + "\"computed\": \(jsonString($0.computed)), \"match\": \($0.stored == $0.computed)}"
            }
            print("{\"image\": \(jsonString(image)), \"bytes\": \(device.virtualSize), \"seconds\": \((seconds * 1000).rounded() / 1000), "
                + "\"digests\": [\(items.joined(separator: ", "))], \"verified\": \(ok)}")
        } else {
            let shown = image.escapingControls
            for r in results {
                let name = r.algorithm.rawValue.uppercased()
                print("\(name) stored in \(shown):\t\(r.stored)")
                print("\(name) computed over the disk:\t\(r.computed)\t\(r.stored == r.computed ? "match" : "MISMATCH")")
            }
            print(ok ? "rawmount: \(shown): verified (\(device.virtualSize) bytes)" : "rawmount: \(shown): FAILED verification")
        }
        if !ok { throw ExitCode.failure }
    }
}
