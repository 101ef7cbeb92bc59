// swift-tools-version:6.0
import PackageDescription

let package = Package(
    name: "rawmount",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "rawmount", targets: ["rawmount"]),
        // nbdkit loads it: nbdkit .build/release/librawmount-nbdkit.so image=disk.vmdk
        .library(name: "rawmount-nbdkit", type: .dynamic, targets: ["NbdkitPlugin"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
        // Digests for `rawmount hash` (BoringSSL's assembly, SHA extensions where the CPU has them).
        .package(url: "https://github.com/apple/swift-crypto", "3.12.3" ..< "5.0.0"),
    ],
    targets: [
        // libfuse3 through a system-library module map; the only C in the project.
        .systemLibrary(name: "CFuse3", path: "Modules/CFuse3", pkgConfig: "fuse3",
                       providers: [.apt(["libfuse3-dev"])]),
        // System zlib for compressed grains.
        .systemLibrary(name: "CZlib", path: "Modules/CZlib", pkgConfig: "zlib", providers: [.apt(["zlib1g-dev"])]),
        // libdeflate: the fast whole-cluster inflate; zlib stays the fallback and the reference.
        .systemLibrary(name: "CDeflate", path: "Modules/CDeflate", pkgConfig: "libdeflate", providers: [.apt(["libdeflate-dev"])]),
        .systemLibrary(name: "CZstd", path: "Modules/CZstd", pkgConfig: "libzstd", providers: [.apt(["libzstd-dev"])]),
        // Intel ISA-L for CRC-32C (VHDX headers, region tables and log entries).
        .systemLibrary(name: "CIsal", path: "Modules/CIsal", pkgConfig: "libisal", providers: [.apt(["libisal-dev"])]),
        // nbdkit's plugin header (no library: nbdkit provides the symbols when it loads us).
        .systemLibrary(name: "CNbdkit", path: "Modules/CNbdkit", pkgConfig: "nbdkit", providers: [.apt(["nbdkit-plugin-dev"])]),
        // Shared engine: file I/O, errors, mappings, table cache, allocator, locking.
        .target(name: "BlockEngine"),
        // Format probes and drivers, one folder per format.
        .target(name: "ImageFormats", dependencies: ["BlockEngine", "CDeflate", "CZlib", "CZstd", "CIsal"]),
        // libfuse3 low-level adapter: knows block devices, not formats.
        .target(name: "FuseAdapter", dependencies: ["CFuse3", "BlockEngine"]),
        // The nbdkit plugin over the engine: NBD for any image, with no protocol code of ours.
        .target(name: "NbdkitPlugin", dependencies: ["CNbdkit", "BlockEngine", "ImageFormats"]),
        .executableTarget(name: "rawmount", dependencies: [
            "FuseAdapter", "ImageFormats", "BlockEngine",
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
            .product(name: "Crypto", package: "swift-crypto"),
        ]),
        // Seeded randomness both test targets share, so failures reproduce.
        .target(name: "TestSupport", path: "Tests/TestSupport"),
        .testTarget(name: "BlockEngineTests", dependencies: ["BlockEngine", "ImageFormats", "TestSupport"]),
        // Fixtures/ holds Python scripts the tests run, not sources.
        .testTarget(name: "IntegrationTests", dependencies: ["BlockEngine", "TestSupport"], exclude: ["Fixtures"]),
    ]
)
