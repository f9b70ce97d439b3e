// SPDX-License-Identifier: MIT
// Test tokens for the evm provider's tests and the sandbox's demo chain.
// Compiled by build.js with solc from npm (the version pinned in package.json);
// tokens.json holds the result, so the tests never compile.
pragma solidity 0.8.37;

/// A plain ERC-20 whose owner mints: balances of any size, a chosen decimals.
contract TestToken {
    string public name;
    string public symbol;
    uint8 public immutable decimals;
    uint256 public totalSupply;
    address public immutable owner;
    mapping(address => uint256) public balanceOf;
    mapping(address => mapping(address => uint256)) public allowance;

    event Transfer(address indexed from, address indexed to, uint256 value);
    event Approval(address indexed owner, address indexed spender, uint256 value);

    constructor(string memory name_, string memory symbol_, uint8 decimals_) {
        name = name_;
        symbol = symbol_;
        decimals = decimals_;
        owner = msg.sender;
    }

    function mint(address to, uint256 value) external {
        require(msg.sender == owner, "only the owner mints");
        totalSupply += value;
        balanceOf[to] += value;
        emit Transfer(address(0), to, value);
    }

    function transfer(address to, uint256 value) external returns (bool) {
        _move(msg.sender, to, value);
        return true;
    }

    function approve(address spender, uint256 value) external returns (bool) {
        allowance[msg.sender][spender] = value;
        emit Approval(msg.sender, spender, value);
        return true;
    }

    function transferFrom(address from, address to, uint256 value) external returns (bool) {
        uint256 allowed = allowance[from][msg.sender];
        require(allowed >= value, "allowance too small");
        if (allowed != type(uint256).max) {
            allowance[from][msg.sender] = allowed - value;
        }
        _move(from, to, value);
        return true;
    }

    function _move(address from, address to, uint256 value) private {
        require(balanceOf[from] >= value, "balance too small");
        balanceOf[from] -= value;
        balanceOf[to] += value;
        emit Transfer(from, to, value);
    }
}

/// balanceOf always reverts (a paused or broken token); decimals() answers.
contract RevertingToken {
    uint8 public constant decimals = 18;

    function balanceOf(address) external pure returns (uint256) {
        revert("balances frozen");
    }
}

/// balanceOf answers 16 bytes, half an ABI word: malformed data.
contract ShortReturnToken {
    uint8 public constant decimals = 18;

    function balanceOf(address) external pure returns (uint256) {
        assembly {
            mstore(0, 0x0102030405060708090a0b0c0d0e0f10)
            return(16, 16)
        }
    }
}

/// decimals() answers 256, which is no uint8: the whole token is malformed.
contract BadDecimalsToken {
    function decimals() external pure returns (uint256) {
        return 256;
    }

    function balanceOf(address) external pure returns (uint256) {
        return 1;
    }
}

/// Pays on what it is sent: value moves inside a transaction, which only traces show.
contract Forwarder {
    /// Sends the whole value on to `to`.
    function pay(address payable to) external payable {
        (bool ok, ) = to.call{value: msg.value}("");
        require(ok, "payment refused");
    }

    /// Splits the value between two payees; a payee that refuses leaves its share here.
    function split(address payable first, address payable second) external payable {
        uint256 half = msg.value / 2;
        first.call{value: half}("");
        second.call{value: msg.value - half}("");
    }

    /// Sends the value on to `to` inside a call that then reverts: nothing moves but the gas.
    function payAndRevert(address payable to) external payable {
        this.payThenFail{value: msg.value}(to);
    }

    function payThenFail(address payable to) external payable {
        (bool ok, ) = to.call{value: msg.value}("");
        require(ok, "payment refused");
        revert("changed my mind");
    }

    /// Tries payThenFail and keeps going when it reverts: the inner payment is undone, the outer call stands.
    function tryPay(address payable to) external payable {
        try this.payThenFail{value: msg.value}(to) {
        } catch {
        }
    }

    /// Gives everything it holds to `to` and ends (SELFDESTRUCT: only the value moves since Cancun).
    function close(address payable to) external {
        selfdestruct(to);
    }

    receive() external payable {}
}

/// Refuses every payment.
contract Refuser {
    receive() external payable {
        revert("no thanks");
    }
}
